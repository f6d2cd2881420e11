"""A real master and two real node agents on loopback, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

pytestmark = pytest.mark.timeout(240)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has ended; only its parent has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _stage(exp: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in exp["stages"] if s["name"] == name)


def _times(stage: dict[str, Any]) -> dict[str, float]:
    return {t["to"]: t["time"] for t in stage["transitions"]}


CHAIN = {
    "name": "chain",
    "priority": 5,
    "resources": {"cpus": 1, "memory": "512MiB"},
    "stages": [
        # 2 CPUs: only beta advertises that many; the whole experiment then stays on beta (its files are there)
        {
            "name": "prepare",
            "kind": "prepare",
            "params": {"demo": {"n": 12, "seed": 1}, "workers": 1},
            "resources": {"cpus": 2},
        },
        {
            "name": "evaluate",
            "kind": "evaluate",
            "after": ["prepare"],
            "params": {"inputs": ["artifacts/prepare/demo.csv.gz"], "workers": 1},
        },
        {"name": "probe", "kind": "probe", "after": ["evaluate"], "params": {"metrics": 4}, "resources": {"gpus": 1}},
    ],
}
SPREAD = {  # independent stages, shared workdir: the first fills alpha (1 CPU), the second must go elsewhere
    "name": "spread",
    "shared_workdir": True,
    "resources": {"cpus": 1, "memory": "512MiB"},
    "stages": [
        {"name": "one", "kind": "probe", "params": {"seconds": 3, "metrics": 1}},
        {"name": "two", "kind": "probe", "params": {"seconds": 3, "metrics": 1}},
    ],
}
TOO_BIG = {"name": "toobig", "stages": [{"name": "huge", "kind": "probe", "resources": {"cpus": 64}}]}


def test_cluster_end_to_end(cluster: Any) -> None:
    address = cluster.start_master()
    _refuses_other_protocol(address)
    cluster.start_node("alpha", "--cpus", "1", "--memory", "2GiB", "--fake-gpus", "0")
    cluster.start_node("beta", "--cpus", "4", "--memory", "8GiB", "--fake-gpus", "2")
    nodes = cluster.wait_for(lambda: _online(cluster), 60, "both nodes to register")
    assert nodes["alpha"]["cpu_count"] == 1 and nodes["beta"]["cpu_count"] == 4
    assert [g["index"] for g in nodes["beta"]["gpus"]] == [0, 1] and nodes["alpha"]["gpus"] == []
    assert {"prepare", "evaluate", "probe"} <= set(nodes["beta"]["stage_kinds"])

    rejected = cluster.cli(
        "submit",
        _write(cluster, {**CHAIN, "stages": CHAIN["stages"][:1] + [{"name": "x", "kind": "trian", "after": ["nope"]}]}),
        check=False,
    )
    assert rejected.returncode == 2
    assert "stages[1].kind: unknown stage kind 'trian'" in rejected.stderr
    assert "stages[1].after[0]: unknown stage 'nope'" in rejected.stderr

    chain = cluster.submit(CHAIN)
    spread = cluster.submit(SPREAD)
    too_big = cluster.submit(TOO_BIG)
    exp = cluster.wait_finished(chain)
    assert exp["state"] == "succeeded", json.dumps(exp, indent=1)

    # dependency order, each stage after its dependency ended, all on beta (the only node that fits prepare)
    prepare, evaluate, probe = (_stage(exp, n) for n in ("prepare", "evaluate", "probe"))
    assert _times(prepare)["succeeded"] <= _times(evaluate)["assigned"] <= _times(evaluate)["succeeded"]
    assert _times(evaluate)["succeeded"] <= _times(probe)["assigned"]
    assert [t["to"] for t in probe["transitions"]] == ["pending", "ready", "assigned", "running", "succeeded"]
    assert {s["node"] for s in exp["stages"]} == {"beta"}
    assert probe["attempts"][0]["gpu_indices"] in ([0], [1])
    assert prepare["attempts"][0]["gpu_indices"] == []

    # logs, metrics and artifacts reached the master
    logs = cluster.cli("logs", f"{chain}/probe", "--json").stdout.splitlines()
    lines = [json.loads(x) for x in logs]
    gpu = probe["attempts"][0]["gpu_indices"][0]
    assert any(x["stream"] == "stdout" and x["text"] == f"CUDA_VISIBLE_DEVICES='{gpu}'" for x in lines)
    assert {x["attempt"] for x in lines} == {1}
    assert any(x["stream"] == "stderr" and x["text"] == "probe on stderr" for x in lines)
    assert any("artifact rejected" in x["text"] and "outside the experiment directory" in x["text"] for x in lines)
    assert [x["seq"] for x in lines] == sorted(x["seq"] for x in lines)
    prepare_log = cluster.cli("logs", str(prepare["stage_id"])).stdout
    assert "wrote 12 demo structures" in prepare_log
    metrics = json.loads(cluster.cli("metrics", f"{chain}/probe", "--json").stdout)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and metrics[1]["values"] == {"loss": 0.5, "lr": 0.1}
    ev_metrics = json.loads(cluster.cli("metrics", f"{chain}/evaluate", "--json").stdout)
    assert ev_metrics and ev_metrics[-1]["values"]["count"] == 12
    artifacts = json.loads(cluster.cli("artifacts", chain, "--json").stdout)
    paths = {(a["stage"], a["path"]) for a in artifacts}
    assert ("probe", f"experiments/{chain}/artifacts/probe/out.txt") in paths
    assert ("prepare", f"experiments/{chain}/artifacts/prepare/demo.csv.gz") in paths
    assert all(not a["path"].startswith(("/", "..")) and a["node"] == "beta" for a in artifacts)
    assert (cluster.tmp / "work-beta" / "experiments" / chain / "artifacts" / "probe" / "out.txt").exists()

    # placement: the two spread stages could not share alpha's single CPU
    sp = cluster.wait_finished(spread)
    assert sp["state"] == "succeeded"
    one, two = _stage(sp, "one"), _stage(sp, "two")
    assert one["node"] == "alpha" and two["node"] == "beta"  # the GPU-less node is preferred for CPU work

    # nothing fits 64 CPUs: the stage stays ready, never assigned
    big = cluster.status(too_big)["experiments"][0]
    assert big["stages"][0]["state"] == "ready" and big["stages"][0]["attempts"] == []
    cluster.cli("cancel", too_big)

    status = cluster.status()
    by_name = {n["name"]: n for n in status["nodes"]}
    assert all(n["online"] and 0 <= n["heartbeat_age_s"] < 5 for n in by_name.values())
    assert by_name["beta"]["allocated"] == {"gpus": 0, "cpus": 0.0, "memory_mib": 0, "gpu_indices": []}
    assert by_name["beta"]["usage"]["memory_total_mib"] > 0
    states = {e["experiment"]: e["state"] for e in status["experiments"]}
    assert states == {chain: "succeeded", spread: "succeeded", too_big: "cancelled"}
    table = cluster.cli("status").stdout
    assert "alpha" in table and "beta" in table and chain in table

    failing = _write(
        cluster, {"name": "failing", "stages": [{"name": "bad", "kind": "probe", "params": {"exit_code": 3}}]}
    )
    waited = cluster.cli("submit", failing, "--wait", check=False)
    assert waited.returncode == 1 and "bad" in waited.stdout and waited.stdout.strip().endswith(": failed")

    _cancel_kills_the_process_tree(cluster)


def _cancel_kills_the_process_tree(cluster: Any) -> None:
    key = cluster.submit(
        {"name": "long", "stages": [{"name": "sleepy", "kind": "probe", "params": {"seconds": 120, "children": 2}}]}
    )
    exp = cluster.wait_for(lambda: _running(cluster, key), 60, "the long stage to run")
    node = _stage(exp, "sleepy")["node"]
    pids_file = cluster.tmp / f"work-{node}" / "experiments" / key / "work" / "sleepy" / "pids.txt"
    pids = cluster.wait_for(
        lambda: pids_file.exists() and [int(x) for x in pids_file.read_text().split()],
        30,
        "the stage to write its pids",
    )
    assert len(pids) == 3 and all(_alive(p) for p in pids)
    follow = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "logs", f"{key}/sleepy", "-f", "--master", cluster.address],
        stdout=subprocess.PIPE,
        text=True,
        env=cluster.env,
    )
    started = time.monotonic()
    out = json.loads(cluster.cli("cancel", key, "--json").stdout)
    assert out == {"experiment": key, "cancelled": 0, "signalled": 1, "finished": None}
    cluster.wait_for(lambda: not any(_alive(p) for p in pids), 5, "the stage's process tree to end")
    assert time.monotonic() - started < 5
    exp = cluster.wait_finished(key, timeout=20)
    stage = _stage(exp, "sleepy")
    assert exp["state"] == "cancelled" and stage["state"] == "cancelled"
    assert stage["attempts"][0]["state"] == "cancelled"
    try:  # `logs -f` ends by itself once the stage has ended
        followed, _ = follow.communicate(timeout=20)
    finally:
        follow.kill()
    assert follow.returncode == 0 and "CUDA_VISIBLE_DEVICES=''" in followed


def _running(cluster: Any, key: str) -> dict[str, Any] | None:
    exp = cluster.status(key)["experiments"][0]
    return exp if exp["stages"][0]["state"] == "running" else None


def _online(cluster: Any) -> dict[str, Any] | None:
    nodes = {n["name"]: n for n in cluster.status()["nodes"] if n["online"]}
    return nodes if {"alpha", "beta"} <= set(nodes) else None


def _write(cluster: Any, plan: dict[str, Any]) -> str:
    path = cluster.tmp / "bad-plan.json"
    path.write_text(json.dumps(plan))
    return str(path)


def _refuses_other_protocol(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION + 1, node_id="x")
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"protocol {PROTOCOL_VERSION + 1}" in err.value.details() and "mismatch" in err.value.details()
