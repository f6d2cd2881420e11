"""The contract between the commands, the master and the node: plan schema, stage kinds, workdir setting.

Below ``infra.master``, ``infra.node`` and the commands; imports none of them, nor crystallm_core or torch.
"""
