"""kill -9 of the master while stages stream events: agents keep running, spool, reconnect and replay;
the restarted master stores every event exactly once and the stage succeeds once."""

from __future__ import annotations

import json

import pytest
from control.conftest import Cluster

from fault.conftest import assert_stream_exactly_once, stage, stored_count, stored_events

pytestmark = pytest.mark.timeout(120)


def test_a_master_killed_mid_stream_loses_and_repeats_nothing(cluster: Cluster) -> None:
    cluster.start_master("--lost-timeout", "3")
    cluster.start_node("steady", heartbeat=0.3)
    cluster.wait_online("steady")
    params = {"lines": 400, "width": 30, "metric_every": 7, "interval": 0.01}
    plan = {
        "name": "mstream",
        "stages": [
            {"name": "a", "kind": "stream", "params": params},
            {"name": "b", "kind": "stream", "after": ["a"], "params": {"lines": 20}},
        ],
    }
    key = cluster.submit(plan)
    cluster.wait_for(lambda: stored_count(cluster.db_url, key, "a") > 60, 60, "the stage to stream")
    cluster.kill_master()
    seen = stored_count(cluster.db_url, key, "a")
    cluster.wait_for(  # the stage goes on without a master: its output piles up in the node's spool
        lambda: (cluster.workdir("steady") / "nodes" / "steady.d" / "spool").exists(), 5, "the spool"
    )
    cluster.restart_master()
    exp = cluster.wait_finished(key, timeout=60)
    assert exp["state"] == "succeeded", json.dumps(exp, indent=1)
    for name in ("a", "b"):
        assert [x["state"] for x in stage(exp, name)["attempts"]] == ["succeeded"]
    events = stored_events(cluster.db_url, key, "a")
    assert list(events) == [1] and len(events[1]) > seen
    assert_stream_exactly_once(events[1], params)
    assert_stream_exactly_once(stored_events(cluster.db_url, key, "b")[1], {"lines": 20})
    transitions = [t["to"] for t in stage(exp, "a")["transitions"]]
    assert transitions == ["pending", "ready", "assigned", "running", "succeeded"]
