"""The master: gRPC server, scheduler and the state database (SQLite or PostgreSQL).

Runs on a small CPU machine: nothing here imports torch, pymatgen or ``crystallm_core``.
"""
