"""The node agent's own bookkeeping, without a master: final reports and their failure classes, cancels that
outlive the agent process."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.node.agent import Agent, Held, Options, final_report
from infra.protos import infra_pb2


def test_every_failed_or_cancelled_report_carries_its_failure_class() -> None:
    def cls(state: str, failure: str | None) -> int:
        final = {"state": state, "exit_code": 1, "message": "m", **({"failure": failure} if failure else {})}
        return final_report("n", 1, "l", final, 3).failure_class

    assert cls("failed", "preempted") == infra_pb2.FAILURE_PREEMPTED
    assert cls("failed", "infra") == infra_pb2.FAILURE_INFRA
    assert cls("failed", "node_lost") == infra_pb2.FAILURE_NODE_LOST
    assert cls("failed", "error") == infra_pb2.FAILURE_ERROR
    assert cls("cancelled", "cancelled") == infra_pb2.FAILURE_CANCELLED
    assert cls("failed", None) == infra_pb2.FAILURE_ERROR  # recorded by an older agent
    assert cls("cancelled", None) == infra_pb2.FAILURE_CANCELLED
    assert cls("succeeded", None) == infra_pb2.FAILURE_CLASS_UNSPECIFIED
    rep = final_report("n", 1, "l", {"state": "failed", "exit_code": 3, "message": "m", "failure": "error"}, 7)
    assert (rep.state, rep.exit_code, rep.message, rep.last_seq) == (infra_pb2.FAILED, 3, "m", 7)


def test_a_cancel_outlives_the_agent_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the cancel reached an agent that was then restarted before the stage ended: the new agent process must
    # still stop it (it ended "succeeded" before: the cancel lived only in the old process's memory)
    monkeypatch.setattr(Agent, "_start", lambda self, *a: None)  # no stage threads: this is bookkeeping only
    opts = Options(master="127.0.0.1:1", workdir=tmp_path, name="n", fake_gpus=0)
    first = Agent(opts)
    a = infra_pb2.Assignment(attempt_id=5, lease_token="l", experiment="e", stage="s", kind="stream", attempt=1)
    first.held[5] = Held(a, active=True)
    first._save(a)
    first.spool.open(5, "l")
    first._revoke(5, "cancelled by alice", stale=False)
    first.conn.close()
    again = Agent(opts)
    assert again.recover() == 1 and 5 in again.cancelled
    again._forget(5)
    assert not (again.attempts_dir / "5.cancel").exists()
    again.conn.close()


def test_what_the_plan_got_wrong_is_an_error_and_what_the_node_lacks_is_infra(tmp_path: Path) -> None:
    agent = Agent(Options(master="127.0.0.1:1", workdir=tmp_path, name="n", fake_gpus=0, min_free_disk_mib=0))

    def build(**fields: str) -> tuple[str, str]:
        a = infra_pb2.Assignment(
            attempt_id=1, lease_token="l", attempt=1, **{"experiment": "e", "stage": "s", **fields}
        )
        command, problem, failure = agent._build(a)
        assert command is None
        return problem, failure

    assert build(kind="no-such-kind")[1] == "infra"  # e.g. its plugin failed to load on this node
    problem, failure = build(kind="train", params_json='{"no_such_param": 1}')
    assert failure == "error" and problem.startswith("invalid params")
    assert build(kind="train", experiment="../x")[1] == "error"
    agent.disk.min_free_mib = 1 << 40  # the node is short of disk
    assert build(kind="train")[1] == "infra"
    agent.conn.close()


def test_a_train_assignment_of_several_processes_runs_under_torchrun(tmp_path: Path) -> None:
    agent = Agent(Options(master="127.0.0.1:1", workdir=tmp_path, name="n", fake_gpus=0, min_free_disk_mib=0))

    def argv(resources: infra_pb2.Resources, gpus: list[int] = []) -> list[str]:  # noqa: B006
        a = infra_pb2.Assignment(
            attempt_id=1, lease_token="l", attempt=1, experiment="e", stage="t", kind="train", params_json="{}"
        )
        a.resources.CopyFrom(resources)
        a.gpu_indices.extend(gpus)
        command, problem, _ = agent._build(a)
        assert command is not None, problem
        (step,) = command.steps
        return step[2:8]

    torchrun = ["torch.distributed.run", "--standalone", "--nproc-per-node"]
    assert argv(infra_pb2.Resources(processes=2)) == [*torchrun, "2", "-m", "crystallm_core.cli"]
    assert argv(infra_pb2.Resources(gpus=4, processes=1), [0, 1, 2, 3])[:4] == [*torchrun, "4"]  # one per GPU
    assert argv(infra_pb2.Resources())[:2] == ["crystallm_core.cli", "train"]  # 0 (an older master): one process
    assert argv(infra_pb2.Resources(gpus=1), [2])[:2] == ["crystallm_core.cli", "train"]
    agent.conn.close()
