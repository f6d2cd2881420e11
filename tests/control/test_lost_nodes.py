"""Lost nodes, retries, revoked leases and re-homing, driven through the controller (real SQLite)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from infra.master import store
from infra.master.controller import Controller
from infra.protos import PROTOCOL_VERSION, infra_pb2

from .controller_kit import run_controller
from .test_controller import _next


def _plan(name: str, stages: list[dict[str, Any]], shared: bool = True) -> str:
    return json.dumps({"name": name, "shared_workdir": shared, "stages": stages})


def _stage(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": {"cpus": 1}, **kw}


async def _register(c: Controller, name: str, running: list[tuple[int, str]] = ()) -> tuple[int, Any]:  # type: ignore[assignment]
    facts = infra_pb2.NodeFacts(name=name, cpu_count=2, memory_mib=8192, stage_kinds=["evaluate"])
    req = infra_pb2.RegisterRequest(
        protocol_version=PROTOCOL_VERSION,
        node_id=name,
        facts=facts,
        running=[infra_pb2.RunningAttempt(attempt_id=i, lease_token=t) for i, t in running],
    )
    session = (await c.register(req)).session
    return session, c.assignments(name, session).__aiter__()


async def _report(c: Controller, node: str, a: infra_pb2.Assignment, state: int) -> tuple[bool, str]:
    rep = infra_pb2.StageStatusReport(node_id=node, attempt_id=a.attempt_id, lease_token=a.lease_token, state=state)
    return await c.report_status(rep)


def _beat(c: Controller, node: str, session: int, running: list[infra_pb2.Assignment] = ()) -> Any:  # type: ignore[assignment]
    req = infra_pb2.HeartbeatRequest(node_id=node, session=session)
    for a in running:
        req.running.add(attempt_id=a.attempt_id, lease_token=a.lease_token)
    return c.heartbeat(req)


def _run(tmp_path: Path, scenario: Any, **kw: Any) -> None:
    run_controller(tmp_path, scenario, **{"heartbeat_interval": 0.1, "persist_interval": 10, "lost_timeout": 0.3, **kw})


async def _stages(c: Controller, key: str) -> dict[str, dict[str, Any]]:
    exp = (await c.read(store.status, c.engine, key, 1))[0]
    return {s["name"]: s for s in exp["stages"]}


def test_a_silent_node_is_lost_its_stages_retried_and_its_copy_revoked(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        stages = [_stage("a", retries={"node_lost": 1}), _stage("b", retries={"node_lost": 0})]
        key = await c.submit(_plan("lost", stages))
        s1, stream1 = await _register(c, "n1")
        a1, b1 = await _next(stream1), await _next(stream1)
        for x in (a1, b1):
            await _report(c, "n1", x, infra_pb2.RUNNING)
        s2, stream2 = await _register(c, "n2")
        for _ in range(5):  # heartbeats within the timeout keep n1
            assert not _beat(c, "n1", s1, [a1, b1]).revoked
            _beat(c, "n2", s2)
            await asyncio.sleep(0.1)
        assert c.node_state(c.nodes["n1"]) == "online"
        while not c.nodes["n1"].lost:  # silence: 3 intervals (0.3 s)
            _beat(c, "n2", s2)
            await asyncio.sleep(0.05)
        a2 = await _next(stream2)  # a retries elsewhere; b (no node_lost budget) failed with the reason
        assert (a2.stage, a2.attempt) == ("a", 2)
        stages = await _stages(c, key)
        assert stages["b"]["state"] == "failed" and "node n1 lost: no heartbeat" in stages["b"]["reason"]
        assert stages["a"]["attempt_rows"][0]["message"].startswith("node n1 lost")
        assert c.node_state(c.nodes["n1"]) == "lost"
        assert _beat(c, "n1", s1, [a1]).reregister  # the lost node must re-register ...
        s1, stream1 = await _register(c, "n1", [(a1.attempt_id, a1.lease_token)])
        cancel = await asyncio.wait_for(stream1.__anext__(), 5)  # ... and is told to kill its stale copy
        assert cancel.WhichOneof("command") == "cancel" and cancel.cancel.attempt_id == a1.attempt_id
        assert list(_beat(c, "n1", s1, [a1]).revoked) == [a1.attempt_id]
        assert (await _report(c, "n1", a1, infra_pb2.SUCCEEDED))[0] is False  # its reports are fenced
        _beat(c, "n2", s2)
        assert (await _report(c, "n2", a2, infra_pb2.RUNNING))[0]
        assert (await _report(c, "n2", a2, infra_pb2.SUCCEEDED))[0]
        assert (await _report(c, "n2", a2, infra_pb2.SUCCEEDED)) == (True, "already recorded")
        stages = await _stages(c, key)
        assert stages["a"]["state"] == "succeeded" and stages["b"]["state"] == "failed"

    _run(tmp_path, scenario)


def test_a_lost_home_node_is_waited_for_then_the_experiment_starts_over(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("home", [_stage("a"), _stage("b", after=["a"], max_retries=2)], shared=False))
        s1, stream1 = await _register(c, "n1")
        a = await _next(stream1)
        await _report(c, "n1", a, infra_pb2.RUNNING)
        await _report(c, "n1", a, infra_pb2.SUCCEEDED)
        b = await _next(stream1)
        await _report(c, "n1", b, infra_pb2.RUNNING)
        s2, stream2 = await _register(c, "n2")
        for _ in range(6):  # n2 stays alive; n1 falls silent
            _beat(c, "n2", s2)
            await asyncio.sleep(0.1)
        assert c.nodes["n1"].lost
        stages = await _stages(c, key)
        assert stages["b"]["state"] == "ready"  # retry pending, but its inputs are on n1: nothing on n2
        assert c.experiments[key].home_node == "n1"
        while c.experiments[key].home_node == "n1":  # home_wait (1 s) passes
            _beat(c, "n2", s2)
            await asyncio.sleep(0.1)
        a2 = await _next(stream2)
        assert (a2.stage, a2.attempt) == ("a", 2)  # starts over: a's output was on n1
        stages = await _stages(c, key)
        assert stages["b"]["state"] == "pending"
        moved = [t for t in stages["a"]["transitions"] if t["from_state"] == "succeeded"]
        assert moved[0]["to_state"] == "ready" and "home node n1 lost" in moved[0]["reason"]
        await _report(c, "n2", a2, infra_pb2.RUNNING)
        await _report(c, "n2", a2, infra_pb2.SUCCEEDED)
        b2 = await _next(stream2)
        assert (b2.stage, b2.attempt) == ("b", 2)

    _run(tmp_path, scenario, home_wait=1.0)


def test_an_attempt_the_node_no_longer_holds_fails_after_two_heartbeats(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("gone", [_stage("a", retries={"node_lost": 0})]))
        s1, stream = await _register(c, "n1")
        a = await _next(stream)
        _beat(c, "n1", s1)  # sent before the RUNNING report below: must not fail it
        await _report(c, "n1", a, infra_pb2.RUNNING)
        _beat(c, "n1", s1)  # the RUNNING report may still have been on its way when this was built
        assert (await _stages(c, key))["a"]["state"] == "running"
        s1, stream = await _register(c, "n1")  # the agent restarted and lost it (e.g. a wiped workdir)
        _beat(c, "n1", s1)
        await asyncio.sleep(0.01)
        _beat(c, "n1", s1)
        await asyncio.sleep(0.1)
        a_stage = (await _stages(c, key))["a"]
        assert a_stage["state"] == "failed" and "no longer runs this attempt" in a_stage["reason"]

    _run(tmp_path, scenario)
