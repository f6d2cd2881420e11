"""kill -9 of a node agent in the middle of a stage: it comes back and adopts the stage, or it stays away
and the stage moves to another node (its orphaned copy is killed when the agent returns)."""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
from control.conftest import Cluster, alive

from fault.conftest import assert_stream_exactly_once, stage, stored_count, stored_events

# What these cases test is the agent (adoption, lost timeout, preemption, signals) against the master's
# decisions; the database under them is the same code on both, exercised on PostgreSQL by the master, network
# and gang fault modules and by tests/control. One database here keeps CI within its time.
pytestmark = [pytest.mark.timeout(120), pytest.mark.parametrize("module_db", ["sqlite"], indirect=True)]
STREAM = {"lines": 240, "width": 40, "metric_every": 10, "interval": 0.02}


def _running(cluster: Cluster, key: str) -> dict[str, Any] | None:
    exp = cluster.status(key)["experiments"][0]
    return exp if exp["stages"][0]["state"] == "running" else None


def _pid(cluster: Cluster, node: str, key: str, name: str) -> int:
    path = cluster.workdir(node) / "experiments" / key / "work" / name / "pids.txt"
    return int(cluster.wait_for(lambda: path.exists() and path.read_text().strip(), 30, "the stage's pid"))


def test_a_killed_agent_comes_back_and_adopts_its_stage(cluster: Cluster) -> None:
    cluster.start_master("--lost-timeout", "20")
    cluster.start_node("adopt", heartbeat=0.3)
    cluster.wait_online("adopt")
    slow = {**STREAM, "interval": 0.08}  # ~19 s: outlasts an agent restart on a loaded machine (~12 s seen)
    plan = {"name": "adopt", "stages": [{"name": "s", "kind": "stream", "params": slow}]}
    key = cluster.submit(plan)
    cluster.wait_for(lambda: stored_count(cluster.db_url, key, "s") > 40, 60, "some events to be stored")
    pid = _pid(cluster, "adopt", key, "s")
    cluster.kill_node("adopt")
    assert alive(pid)  # the stage outlives its agent
    cluster.start_node("adopt", heartbeat=0.3)
    exp = cluster.wait_finished(key, timeout=60)
    s = stage(exp, "s")
    assert exp["state"] == "succeeded" and [a["state"] for a in s["attempts"]] == ["succeeded"], json.dumps(exp)
    events = stored_events(cluster.db_url, key, "s")[1]
    assert any(e["type"] == "log" and e["text"].startswith("adopted step 1") for e in events)
    assert_stream_exactly_once(events, slow)


def test_an_agent_restarted_within_seconds_keeps_its_stage_with_the_default_lost_timeout(cluster: Cluster) -> None:
    """Issue 14.7: kill -9 of an agent and a restart seconds later (longer than the old 3-heartbeat lost
    timeout) must not lose the stage: the default timeout (12 heartbeats) tolerates an agent restart."""
    cluster.start_master()  # --heartbeat 1: the default lost timeout is 12 s (it was 3 s)
    cluster.start_node("quick", heartbeat=1.0)
    cluster.wait_online("quick")
    params = {**STREAM, "interval": 0.05}
    key = cluster.submit({"name": "quick", "stages": [{"name": "s", "kind": "stream", "params": params}]})
    cluster.wait_for(lambda: stored_count(cluster.db_url, key, "s") > 20, 60, "some events to be stored")
    cluster.kill_node("quick")
    time.sleep(4)  # past the old lost timeout, before the new one
    cluster.start_node("quick", heartbeat=1.0)
    exp = cluster.wait_finished(key, timeout=90)
    s = stage(exp, "s")
    assert exp["state"] == "succeeded" and [a["state"] for a in s["attempts"]] == ["succeeded"], json.dumps(exp)
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "s")[1], params)


def test_an_agent_that_stays_away_loses_its_stage_to_another_node(cluster: Cluster) -> None:
    cluster.start_master("--lost-timeout", "2")
    cluster.start_node("gone", heartbeat=0.3)
    cluster.wait_online("gone")
    slow = {**STREAM, "lines": 300, "interval": 0.03}
    plan = {
        "name": "moves",
        "shared_workdir": True,
        "stages": [
            {"name": "s", "kind": "stream", "params": slow, "retries": {"node_lost": 1}},
            {"name": "once", "kind": "stream", "params": slow, "retries": {"node_lost": 0}},
        ],
    }
    key = cluster.submit(plan)
    cluster.wait_for(
        lambda: all(x["state"] == "running" for x in cluster.status(key)["experiments"][0]["stages"]),
        60,
        "both stages to run",
    )
    pid = _pid(cluster, "gone", key, "s")
    cluster.kill_node("gone")
    cluster.start_node("other", heartbeat=0.3)

    def retried() -> bool:
        attempts = stage(cluster.status(key)["experiments"][0], "s")["attempts"]
        return len(attempts) == 2 and attempts[1]["state"] == "running"

    cluster.wait_for(retried, 60, "the stage to run again on the other node")
    assert alive(pid)  # the orphaned copy runs until its agent is back ...
    cluster.start_node("gone", heartbeat=0.3)
    cluster.wait_for(lambda: not alive(pid), 30, "the agent to kill its stale copy")  # ... then it is killed

    exp = cluster.wait_finished(key, timeout=90)
    s, once = stage(exp, "s"), stage(exp, "once")
    assert exp["state"] == "failed"
    assert [a["state"] for a in s["attempts"]] == ["failed", "succeeded"] and s["state"] == "succeeded"
    assert [a["node"] for a in s["attempts"]] == ["gone", "other"]
    assert "node gone lost: no heartbeat" in s["attempts"][0]["message"]
    assert once["state"] == "failed" and "node gone lost" in once["reason"]
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "s")[2], slow)
    first = [e["text"] for e in stored_events(cluster.db_url, key, "s")[1] if e["type"] == "log"]
    assert len(first) == len(set(first))  # the lost attempt's events: a prefix, nothing twice


def test_a_stopped_agent_lets_stages_finish_then_preempts_the_rest_which_run_elsewhere(cluster: Cluster) -> None:
    cluster.start_master("--lost-timeout", "20")
    agent = cluster.start_node("leaving", "--stop-deadline", "6", heartbeat=0.3)
    cluster.wait_online("leaving")
    short = {**STREAM, "lines": 60, "interval": 0.05}  # ~3 s: ends within the deadline
    long = {**STREAM, "lines": 400, "interval": 0.03}  # ~12 s: stopped at the deadline, run again elsewhere
    plan = {
        "name": "leave",
        "shared_workdir": True,
        "stages": [
            {"name": "short", "kind": "stream", "params": short},
            {"name": "long", "kind": "stream", "params": long, "max_retries": 1},
        ],
    }
    key = cluster.submit(plan)
    cluster.wait_for(
        lambda: all(x["state"] == "running" for x in cluster.status(key)["experiments"][0]["stages"]),
        60,
        "both stages to run",
    )
    agent.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    node = cluster.wait_for(
        lambda: next((n for n in cluster.status()["nodes"] if n["name"] == "leaving" and n["unavailable"]), None),
        20,
        "the node to say that it stops",
    )
    assert node["unavailable"].startswith("stopping")
    cluster.start_node("other", heartbeat=0.3)
    assert agent.wait(60) == 0 and time.monotonic() - stopped_at < 6 + 30
    exp = cluster.wait_finished(key, timeout=90)
    s, lg = stage(exp, "short"), stage(exp, "long")
    assert [(a["state"], a["node"]) for a in s["attempts"]] == [("succeeded", "leaving")], json.dumps(exp)
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "short")[1], short)
    assert [(a["state"], a["node"]) for a in lg["attempts"]] == [("failed", "leaving"), ("succeeded", "other")]
    assert "stop deadline (6 s) passed" in lg["attempts"][0]["message"] and exp["state"] == "succeeded"
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "long")[2], long)
    log = (cluster.tmp / "leaving.log").read_text()
    assert "ended failed (preempted)" in log and "ended succeeded" in log


def test_a_cancel_during_a_flood_of_output_ends_the_stage_cancelled(cluster: Cluster) -> None:
    # issue 14: a stage printing as fast as it can stalled the agent (quadratic reader); `infra cancel` had
    # no effect. Now the reader keeps up in bounded pieces and a cancel ends the attempt cancelled at once.
    cluster.start_master()
    cluster.start_node("flood", heartbeat=0.3)
    cluster.wait_online("flood")
    flood = {"lines": 150_000, "width": 60, "metric_every": 1000, "interval": 0.0, "delay": 0.5}
    key = cluster.submit({"name": "flood", "stages": [{"name": "s", "kind": "stream", "params": flood}]})
    cluster.wait_for(lambda: stored_count(cluster.db_url, key, "s") > 1000, 60, "some output to be stored")
    cluster.cli("cancel", key)
    exp = cluster.wait_finished(key, timeout=90)
    s = stage(exp, "s")
    assert exp["state"] == "cancelled" and [a["state"] for a in s["attempts"]] == ["cancelled"], json.dumps(exp)


def test_a_second_signal_stops_the_stages_at_once(cluster: Cluster) -> None:
    cluster.start_master("--lost-timeout", "20")
    agent = cluster.start_node("hurry", "--stop-deadline", "600", heartbeat=0.3)
    cluster.wait_online("hurry")
    # no preempted retry: no other node would take it, and the class is what this test checks
    stage_plan = {"name": "s", "kind": "probe", "params": {"seconds": 120}, "retries": {"preempted": 0}}
    key = cluster.submit({"name": "hurry", "stages": [stage_plan]})
    pid = _pid(cluster, "hurry", key, "s")
    agent.send_signal(signal.SIGTERM)
    cluster.wait_for(
        lambda: any(n["name"] == "hurry" and n["unavailable"] for n in cluster.status()["nodes"]), 20, "stopping"
    )
    assert agent.poll() is None and alive(pid)  # the first signal waits for the stage (deadline 600 s)
    agent.send_signal(signal.SIGINT)
    assert agent.wait(40) == 0
    assert not alive(pid)
    exp = cluster.wait_finished(key, timeout=60)
    attempt = stage(exp, "s")["attempts"][0]
    assert (
        attempt["state"] == "failed"
        and attempt["failure_class"] == "preempted"
        and "the node agent of hurry was stopped: run again elsewhere" in attempt["message"]
    )
    assert "ended failed (preempted)" in (cluster.tmp / "hurry.log").read_text()
