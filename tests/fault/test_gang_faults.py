"""A train stage on two nodes (``"nodes": 2``): two real agents on this machine sharing one workdir, a real
master, torchrun's static rendezvous and gloo on the CPU. It trains to success writing one checkpoint set
and each step's metrics once; when one member's agent is killed (-9) mid-run, the master stops the other
member and the gang is retried as one attempt that resumes from the checkpoint and succeeds."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from control.conftest import Cluster, wait_for

pytestmark = pytest.mark.slow

SHARED = "work-shared"  # both agents' workdir (the conftest's leftover-stage sweep finds work-*/)


def _plan(name: str, train: dict[str, Any], retries: dict[str, int] | None = None) -> dict[str, Any]:
    stage = {"name": "train", "kind": "train", "after": ["prepare"], "params": train, "resources": {"nodes": 2}}
    if retries:
        stage["retries"] = retries
    return {
        "name": name,
        "shared_workdir": True,
        "resources": {"gpus": 0, "cpus": 1, "memory": "1GiB"},
        "stages": [
            {"name": "prepare", "kind": "prepare", "params": {"demo": {"n": 24, "seed": 0}, "workers": 1}},
            stage,
        ],
    }


@pytest.fixture
def gang(tmp_path: Path) -> Iterator[Cluster]:
    """A master (SQLite) with rendezvous ports of its own and a short lost timeout, and agents n1, n2 (one
    CPU each, so each runs one member) on one shared workdir; more with ``gang.start_node``."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'master.db'}")
    try:
        c.start_master("--rendezvous-ports", "29650-29659", "--lost-timeout", "5")
        for name in ("n1", "n2"):
            _node(c, name)
        c.wait_online("n1", "n2")
        yield c
    finally:
        c.stop()


def _node(c: Cluster, name: str) -> None:
    c.start_node(name, "--workdir", str(c.tmp / SHARED), "--cpus", "1", "--advertise-address", "127.0.0.1")


def _events(c: Cluster, key: str) -> list[tuple[int, int, str, dict[str, Any]]]:
    """(attempt number, rank, type, data) of every event the master stored for the train stage."""
    with sqlite3.connect(c.tmp / "master.db") as db:
        rows = db.execute(
            "SELECT a.number, a.rank, e.type, e.data FROM events e JOIN attempts a ON a.id = e.attempt_id "
            "JOIN stages s ON s.id = a.stage_id JOIN experiments x ON x.id = s.experiment_id "
            "WHERE x.key = ? AND s.name = 'train' ORDER BY a.number, a.rank, e.seq",
            (key,),
        ).fetchall()
    return [(n, r, t, json.loads(d)) for n, r, t, d in rows]


def _train_attempts(exp: dict[str, Any]) -> list[dict[str, Any]]:
    return next(s for s in exp["stages"] if s["name"] == "train")["attempts"]


def test_a_two_node_train_stage_trains_once_and_writes_one_checkpoint(gang: Cluster) -> None:
    key = gang.submit({**_plan("gang", {"model": "tiny"}), "smoke": True})
    exp = gang.wait_finished(key, timeout=240)
    assert exp["state"] == "succeeded", json.dumps(exp, indent=1)
    attempts = _train_attempts(exp)
    assert sorted((a["number"], a["rank"], a["state"]) for a in attempts) == [(1, 0, "succeeded"), (1, 1, "succeeded")]
    assert {a["node"] for a in attempts} == {"n1", "n2"}
    record = gang.tmp / SHARED / "experiments" / key
    assert sorted(p.name for p in record.rglob("*.pt")) == ["best.pt", "last.pt"]
    member0 = (record / "logs" / "train.log").read_text()
    assert "--nnodes 2 --node-rank 0" in member0 and "--master-addr 127.0.0.1 --master-port 2965" in member0
    assert "rank 0 of 2" in member0
    assert "--nnodes 2 --node-rank 1" in (record / "logs" / "train@1.log").read_text()
    metrics = [(r, d["step"]) for _, r, t, d in _events(gang, key) if t == "metric" and "loss" in d["values"]]
    steps = [step for _, step in metrics]
    assert steps and len(steps) == len(set(steps)) and {r for r, _ in metrics} == {0}  # each step once
    shown = gang.cli("metrics", f"{key}/train", "--json").stdout
    assert len([line for line in shown.splitlines() if '"loss"' in line]) == len(steps)


def test_a_killed_member_agent_ends_the_gang_which_resumes_from_its_checkpoint(gang: Cluster) -> None:
    """kill -9 of member 1's agent: the node is lost after the lost timeout, the master stops the other
    member (which ends cancelled, no vote), and the gang is retried as one ``node_lost`` attempt (on the two
    remaining nodes of three) from ``ckpts/last.pt``. The killed agent's training processes are frozen
    (SIGSTOP), as on a machine that hangs, so that the run cannot end on its own before the master notices,
    however slow this machine is."""
    train = {
        "model": "tiny",
        "max_steps": 20,
        "overrides": {
            **{"block_size": 256, "batch_size": 1, "grad_accum": 2},
            **{"eval_interval": 5, "eval_batches": 1, "log_interval": 5},
        },
    }
    key = gang.submit(_plan("kill", train))
    _node(gang, "n3")  # a third node: the retry runs on the two that remain
    record = gang.tmp / SHARED / "experiments" / key
    wait_for(lambda: (record / "ckpts" / "last.pt").exists(), 240, "the first checkpoint", interval=0.02)
    run = json.loads((record / "work" / "train@1" / ".infra" / "attempt-1" / "run.json").read_text())
    launcher = psutil.Process(run["pid"])  # first, so that the run cannot go on
    frozen = [launcher, *launcher.children(recursive=True)]  # torchrun's workers have sessions of their own
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    try:
        _killed_member_run(gang, key, record)
    finally:  # the frozen copy never ends by itself
        for proc in frozen:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _killed_member_run(gang: Cluster, key: str, record: Path) -> None:
    exp = gang.status(key)["experiments"][0]
    victim = next(a["node"] for a in _train_attempts(exp) if a["rank"] == 1 and a["number"] == 1)
    survivor = next(a["node"] for a in _train_attempts(exp) if a["rank"] == 0 and a["number"] == 1)
    gang.kill_node(victim)
    exp = gang.wait_finished(key, timeout=300)
    assert exp["state"] == "succeeded", json.dumps(exp, indent=1)
    first = {a["rank"]: a for a in _train_attempts(exp) if a["number"] == 1}
    assert first[1]["state"] == "failed" and first[1]["failure_class"] == "node_lost"
    assert first[0]["state"] == "cancelled" and first[0]["failure_class"] == "cancelled"  # stopped: no vote
    stage = next(s for s in exp["stages"] if s["name"] == "train")
    (retried,) = [t["reason"] for t in stage["transitions"] if t["from"] == "running" and t["to"] == "ready"]
    assert retried.startswith(f"attempt 1: member 1 on {victim} failed (exit -1, node_lost)"), retried
    assert retried.endswith(f"; stopped the other member on {survivor}; retry 1 of 3 (node_lost)"), retried
    second = [a for a in _train_attempts(exp) if a["number"] == 2]
    assert sorted(a["state"] for a in second) == ["succeeded", "succeeded"]
    assert {a["node"] for a in second} == {"n1", "n2", "n3"} - {victim} and survivor != victim
    assert max(a["number"] for a in _train_attempts(exp)) == 2  # one retry for the whole gang
    log = (record / "logs" / "train.log").read_text()
    assert "--resume" in log.split("--node-rank 0", 2)[-1]  # the retry's member 0 resumed
    steps = [d["step"] for n, _, t, d in _events(gang, key) if t == "metric" and n == 2 and "loss" in d["values"]]
    assert steps and min(steps) > 5  # continued after the checkpoint, not from the start
