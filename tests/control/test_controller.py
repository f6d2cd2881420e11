"""The master's state machine and scheduler, driven directly (real SQLite, no network)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from infra.master import store
from infra.master.controller import Controller
from infra.master.db import make_engine, migrate
from infra.master.models import Event, Transition
from infra.protos import PROTOCOL_VERSION, infra_pb2
from infra.spec.plan import PlanError

from .controller_kit import WiredController, run_controller


def _plan(name: str, priority: int, stages: list[dict[str, Any]] | None = None) -> str:
    one = [{"name": "s", "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": {"cpus": 1, "memory": 512}}]
    return json.dumps({"name": name, "priority": priority, "stages": stages or one})


async def _node(c: Controller, name: str, cpus: int = 1) -> tuple[int, Any]:
    facts = infra_pb2.NodeFacts(name=name, cpu_count=cpus, memory_mib=4096, stage_kinds=["evaluate"])
    resp = await c.register(infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=name, facts=facts))
    return resp.session, c.assignments(name, resp.session).__aiter__()


async def _next(stream: Any) -> infra_pb2.Assignment:
    cmd = await asyncio.wait_for(stream.__anext__(), 5)
    assert cmd.WhichOneof("command") == "assign"
    return cmd.assign


async def _report(c: Controller, a: infra_pb2.Assignment, state: int, node: str = "n1") -> tuple[bool, str]:
    rep = infra_pb2.StageStatusReport(node_id=node, attempt_id=a.attempt_id, lease_token=a.lease_token, state=state)
    return await c.report_status(rep)


def _run(tmp_path: Path, scenario: Any) -> None:
    run_controller(tmp_path, scenario, heartbeat_interval=1, persist_interval=0.1)


def test_priority_first_then_submission_order(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        keys = [await c.submit(_plan(n, p)) for n, p in (("low", 0), ("high", 5), ("high2", 5), ("mid", 1))]
        _, stream = await _node(c, "n1", cpus=1)  # room for one stage at a time
        order = []
        for _ in keys:
            a = await _next(stream)
            order.append(a.experiment)
            assert (await _report(c, a, infra_pb2.RUNNING))[0]
            assert (await _report(c, a, infra_pb2.SUCCEEDED))[0]
        assert order == ["high-2", "high2-3", "mid-4", "low-1"]

    _run(tmp_path, scenario)


def test_retry_fencing_and_cascade(tmp_path: Path) -> None:
    stages = [
        {"name": "a", "kind": "evaluate", "params": {"inputs": ["x"]}, "max_retries": 1},
        {"name": "b", "kind": "evaluate", "after": ["a"], "params": {"inputs": ["x"]}},
        {"name": "c", "kind": "evaluate", "after": ["b"], "params": {"inputs": ["x"]}},
    ]

    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("r", 0, stages))
        _, stream = await _node(c, "n1", cpus=4)
        first = await _next(stream)
        assert (first.stage, first.attempt) == ("a", 1)
        await _report(c, first, infra_pb2.RUNNING)
        await _report(c, first, infra_pb2.FAILED)
        second = await _next(stream)  # one retry is allowed
        assert (second.stage, second.attempt) == ("a", 2) and second.lease_token != first.lease_token
        assert await _report(c, first, infra_pb2.SUCCEEDED) == (
            False,
            "stale lease: this attempt is not current at the master",
        )
        await _report(c, second, infra_pb2.FAILED)
        exp = (await c.read(store.status, c.engine, key, 1))[0]
        assert exp["state"] == "failed"
        states = {s["name"]: (s["state"], s["reason"]) for s in exp["stages"]}
        assert states["a"][0] == "failed" and states["b"] == ("cancelled", "dependency 'a' failed")
        assert states["c"] == ("cancelled", "dependency 'b' failed")
        reasons = [t["reason"] for t in exp["stages"][0]["transitions"]]
        assert "attempt 1 failed (exit 0, error); retry 1 of 1 (error)" in reasons

    _run(tmp_path, scenario)


def test_events_are_stored_once_and_heartbeats_touch_no_table(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        await c.submit(_plan("e", 0))
        session, stream = await _node(c, "n1")
        a = await _next(stream)
        batch = infra_pb2.EventBatch(node_id="n1")
        for seq in (1, 2):
            ev = batch.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=seq, time=1.0)
            ev.log.stream, ev.log.text = "stdout", f"line {seq}"
        stale = batch.events.add(attempt_id=a.attempt_id, lease_token="forged", seq=3, time=1.0)
        stale.log.text = "x"
        bad = batch.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=4, time=1.0)
        bad.artifact.path, bad.artifact.kind = "../../etc/passwd", "report"
        assert await c.report_events(batch) == (3, [a.attempt_id])
        assert (await c.report_events(batch))[0] == 0  # re-delivery after a lost ack stores nothing twice
        with Session(c.engine) as s:
            assert s.scalar(select(func.count()).select_from(Event)) == 3
            assert s.scalars(select(Event.type).order_by(Event.seq)).all() == ["log", "log", "log"]
            before = s.scalar(select(func.count()).select_from(Transition))
        hb = infra_pb2.HeartbeatRequest(node_id="n1", session=session)
        hb.usage.cpu_percent = 12.5
        assert not c.heartbeat(hb).reregister
        assert c.heartbeat(infra_pb2.HeartbeatRequest(node_id="n1", session=session + 1)).reregister
        await asyncio.sleep(0.3)  # the periodic flush persists the last usage, not every beat
        with Session(c.engine) as s:
            from infra.master.models import Node

            assert s.get(Node, "n1").usage == {"cpu_percent": 12.5}
            assert s.scalar(select(func.count()).select_from(Transition)) == before

    _run(tmp_path, scenario)


def test_a_restarted_master_continues_where_it_stopped(tmp_path: Path) -> None:
    stages = [
        {"name": "a", "kind": "evaluate", "params": {"inputs": ["x"]}},
        {"name": "b", "kind": "evaluate", "after": ["a"], "params": {"inputs": ["x"]}},
    ]

    async def main() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
        migrate(engine)
        c = WiredController(engine, heartbeat_interval=1)
        await c.start()
        key = await c.submit(_plan("restart", 0, stages))
        _, stream = await _node(c, "n1", cpus=4)
        a = await _next(stream)
        await _report(c, a, infra_pb2.RUNNING)
        await c.stop()

        c = WiredController(engine, heartbeat_interval=1)  # a new master process on the same database
        await c.start()
        try:
            assert c.nodes["n1"].used_cpus == 1.0  # the running attempt still holds its resources
            facts = infra_pb2.NodeFacts(name="n1", cpu_count=4, memory_mib=4096, stage_kinds=["evaluate"])
            running = [infra_pb2.RunningAttempt(attempt_id=a.attempt_id, lease_token=a.lease_token)]
            req = infra_pb2.RegisterRequest(
                protocol_version=PROTOCOL_VERSION, node_id="n1", facts=facts, running=running
            )
            session = (await c.register(req)).session
            stream = c.assignments("n1", session).__aiter__()
            assert await _report(c, a, infra_pb2.SUCCEEDED) == (True, "")
            b = await _next(stream)
            assert (b.experiment, b.stage, b.attempt) == (key, "b", 1) and b.attempt_id == a.attempt_id + 1
        finally:
            await c.stop()
            engine.dispose()

    asyncio.run(main())


def test_a_stage_s_processes_reach_the_node_also_after_a_master_restart(tmp_path: Path) -> None:
    """``resources.processes`` has no column: the master keeps it in the stored plan and sends it in the
    assignment's Resources (issue 16)."""
    small = {"gpus": 0, "cpus": 1, "memory": 512}
    stages = [
        {"name": "a", "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": small},
        {"name": "t", "kind": "train", "after": ["a"], "resources": {**small, "processes": 3}},
    ]
    facts = infra_pb2.NodeFacts(name="n1", cpu_count=4, memory_mib=4096, stage_kinds=["evaluate", "train"])

    async def register(c: Controller, running: list[infra_pb2.RunningAttempt]) -> Any:
        req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id="n1", facts=facts, running=running)
        return c.assignments("n1", (await c.register(req)).session).__aiter__()

    async def main() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
        migrate(engine)
        c = WiredController(engine, heartbeat_interval=1)
        await c.start()
        await c.submit(_plan("procs", 0, stages))
        a = await _next(await register(c, []))
        assert a.resources.processes == 1
        await _report(c, a, infra_pb2.RUNNING)
        await c.stop()

        c = WiredController(engine, heartbeat_interval=1)  # a new master process on the same database
        await c.start()
        try:
            stream = await register(c, [infra_pb2.RunningAttempt(attempt_id=a.attempt_id, lease_token=a.lease_token)])
            assert await _report(c, a, infra_pb2.SUCCEEDED) == (True, "")
            t = await _next(stream)
            assert (t.stage, t.resources.processes, list(t.gpu_indices)) == ("t", 3, [])
            assert json.loads(t.plan_json)["stages"][1]["resources"]["processes"] == 3
        finally:
            await c.stop()
            engine.dispose()

    asyncio.run(main())


def test_a_stage_kind_is_known_while_a_registered_node_offers_it(tmp_path: Path) -> None:
    """The kinds that nodes offer are kept between submissions and follow every registration."""
    relax = [{"name": "r", "kind": "relax", "params": {}, "resources": {"cpus": 1, "memory": 512}}]

    async def register(c: Controller, kinds: list[str]) -> None:
        facts = infra_pb2.NodeFacts(name="n1", cpu_count=1, memory_mib=4096, stage_kinds=kinds)
        await c.register(infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id="n1", facts=facts))

    async def scenario(c: Controller) -> None:
        with pytest.raises(PlanError, match="unknown stage kind 'relax'"):
            await c.submit(_plan("before", 0, relax))
        await register(c, ["evaluate", "relax"])
        assert await c.submit(_plan("offered", 0, relax)) == "offered-1"
        await register(c, ["evaluate"])  # the node came back without it
        with pytest.raises(PlanError, match="unknown stage kind 'relax'"):
            await c.submit(_plan("withdrawn", 0, relax))

    _run(tmp_path, scenario)
