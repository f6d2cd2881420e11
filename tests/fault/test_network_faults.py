"""The network between a node and the master: short cuts change nothing, a partition longer than the
lost timeout moves the stage and the partitioned copy dies when its agent reconnects, a full spool drops
log lines (counted) but never metrics, artifacts or state changes, and re-delivered events are stored once."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc
import pytest
from control.conftest import Cluster

from fault.conftest import assert_stream_exactly_once, expected_stream, stage, stored_count, stored_events
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def _state(cluster: Cluster, key: str, name: str) -> dict[str, Any]:
    return stage(cluster.status(key)["experiments"][0], name)


def test_cuts_shorter_than_the_lost_timeout_change_nothing(cluster: Cluster, proxy: Any) -> None:
    cluster.start_master("--lost-timeout", "5")
    net = proxy()
    cluster.start_node("flaky", master=net.address, heartbeat=0.3)
    cluster.wait_online("flaky")
    params = {"lines": 300, "width": 20, "metric_every": 5, "interval": 0.02}
    key = cluster.submit({"name": "cuts", "stages": [{"name": "s", "kind": "stream", "params": params}]})
    cluster.wait_for(lambda: stored_count(cluster.db_url, key, "s") > 20, 60, "the stage to stream")
    for _ in range(4):  # connections reset mid-call: lost acknowledgements, re-sent batches
        net.cut()
        time.sleep(0.5)
        net.heal()
        time.sleep(1.0)
    exp = cluster.wait_finished(key, timeout=60)
    s = stage(exp, "s")
    assert exp["state"] == "succeeded" and [a["state"] for a in s["attempts"]] == ["succeeded"], json.dumps(exp)
    assert [t["to"] for t in s["transitions"]] == ["pending", "ready", "assigned", "running", "succeeded"]
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "s")[1], params)
    assert "lost" not in (cluster.tmp / "master.log").read_text()
    cluster.wait_online("flaky", timeout=20)


def test_a_long_partition_moves_the_stage_and_kills_the_cut_off_copy(cluster: Cluster, proxy: Any) -> None:
    cluster.start_master("--lost-timeout", "2")
    net = proxy()
    cluster.start_node("island", master=net.address, heartbeat=0.3)
    cluster.wait_online("island")
    params = {"lines": 500, "width": 20, "metric_every": 5, "interval": 0.02}
    plan = {
        "name": "part",
        "shared_workdir": True,
        "stages": [{"name": "s", "kind": "stream", "params": params, "max_retries": 1}],
    }
    key = cluster.submit(plan)
    cluster.wait_for(lambda: _state(cluster, key, "s")["state"] == "running", 60, "the stage to run")
    pid_file = cluster.workdir("island") / "experiments" / key / "work" / "s" / "pids.txt"
    pid = int(cluster.wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "its pid"))
    net.stall()
    cluster.start_node("mainland", heartbeat=0.3)
    cluster.wait_for(lambda: len(_state(cluster, key, "s")["attempts"]) == 2, 30, "the stage to move")
    assert _alive(pid)  # still running on the island, which cannot hear the master
    net.heal()
    cluster.wait_for(lambda: not _alive(pid), 30, "the island's copy to be killed after reconnecting")
    exp = cluster.wait_finished(key, timeout=60)
    s = stage(exp, "s")
    assert exp["state"] == "succeeded"
    assert [(a["node"], a["state"]) for a in s["attempts"]] == [("island", "failed"), ("mainland", "succeeded")]
    assert "lost" in s["attempts"][0]["message"]
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "s")[2], params)


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_full_spool_drops_log_lines_counted_and_keeps_the_rest(cluster: Cluster, proxy: Any) -> None:
    cluster.start_master("--lost-timeout", "30")
    net = proxy()
    cluster.start_node("small", "--spool-limit", "1MiB", master=net.address, heartbeat=0.3)
    cluster.wait_online("small")
    params = {"lines": 8000, "width": 150, "metric_every": 100, "interval": 0.0, "delay": 2.0}
    key = cluster.submit({"name": "full", "stages": [{"name": "s", "kind": "stream", "params": params}]})
    cluster.wait_for(lambda: _state(cluster, key, "s")["state"] == "running", 60, "the stage to run")
    net.cut()  # the master is unreachable for the rest of the stage: ~1.8 MB of spooled lines for a 1 MiB spool
    done = cluster.workdir("small") / "experiments" / key / "artifacts" / "s" / "out.txt"
    cluster.wait_for(done.exists, 60, "the stage to finish while cut off")
    net.heal()
    exp = cluster.wait_finished(key, timeout=60)
    assert exp["state"] == "succeeded" and [a["state"] for a in stage(exp, "s")["attempts"]] == ["succeeded"]
    events = stored_events(cluster.db_url, key, "s")[1]
    lines, steps = expected_stream(params)
    stdout = [e["text"] for e in events if e["type"] == "log" and e["stream"] == "stdout"]
    dropped = [e for e in events if e["type"] == "dropped"]
    assert dropped and sum(d["logs"] for d in dropped) == len(lines) - len(stdout) > 0
    assert all(d["metrics"] == 0 for d in dropped)  # log lines went first; that was enough
    assert len(set(stdout)) == len(stdout) and stdout == [x for x in lines if x in set(stdout)]
    assert [e["step"] for e in events if e["type"] == "metric"] == steps
    assert [e["type"] for e in events].count("artifact") == 1
    logs = cluster.cli("logs", f"{key}/s").stdout
    assert "events dropped" in logs and "spool was full" in logs


def test_redelivered_events_are_stored_once(cluster: Cluster) -> None:
    address = cluster.start_master()
    key = None
    with grpc.insecure_channel(address) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        facts = infra_pb2.NodeFacts(name="twice", cpu_count=2, memory_mib=4096, stage_kinds=["stream"])
        reg = stub.Register(
            infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id="twice-node", facts=facts), timeout=10
        )
        stream = stub.Assignments(infra_pb2.AssignmentStreamRequest(node_id="twice-node", session=reg.session))
        key = cluster.submit({"name": "dup", "stages": [{"name": "s", "kind": "stream", "params": {"lines": 3}}]})
        a = next(iter(stream)).assign
        rep = infra_pb2.StageStatusReport(
            node_id="twice-node", attempt_id=a.attempt_id, lease_token=a.lease_token, state=infra_pb2.RUNNING
        )
        assert stub.ReportStatus(rep, timeout=10).accepted

        def batch(first: int, last: int) -> infra_pb2.EventBatch:
            out = infra_pb2.EventBatch(node_id="twice-node")
            for seq in range(first, last + 1):
                ev = out.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=seq, time=time.time())
                ev.log.stream, ev.log.text = "stdout", f"event {seq}"
            return out

        stored: list[int] = []
        senders = [  # the same batch, concurrently, and overlapping ones
            threading.Thread(target=lambda b=b: stored.append(stub.ReportEvents(b, timeout=10).stored))
            for b in (batch(1, 50), batch(1, 50), batch(1, 50), batch(25, 80), batch(60, 100))
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join(30)
        assert sum(stored) == 100
        rep.state = infra_pb2.SUCCEEDED
        assert stub.ReportStatus(rep, timeout=10).accepted
        assert stub.ReportStatus(rep, timeout=10).reason == "already recorded"  # a repeated final report
        stream.cancel()
    events = stored_events(cluster.db_url, key, "s")[1]
    assert [e["text"] for e in events] == [f"event {i}" for i in range(1, 101)]
    assert cluster.wait_finished(key)["state"] == "succeeded"
