"""A ready stage that no node takes says why in its reason: what no online node has (a kind, an extra,
enough of a resource), a busy or lost home node, or resources in use; the reason is written only when it
changes, as the stage's row (no transition), and the next transition replaces it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from infra.master import store
from infra.master.controller import Controller
from infra.protos import PROTOCOL_VERSION, infra_pb2

from .conftest import Cluster
from .controller_kit import run_controller
from .test_controller import _next


def _plan(name: str, stages: list[dict[str, Any]], shared: bool = False, priority: int = 0) -> str:
    return json.dumps({"name": name, "shared_workdir": shared, "priority": priority, "stages": stages})


def _stage(name: str, kind: str = "evaluate", **kw: Any) -> dict[str, Any]:
    params = {"inputs": ["x"]} if kind == "evaluate" else {}
    return {"name": name, "kind": kind, "params": params, "resources": {"cpus": 1, "memory": 512}, **kw}


async def _register(c: Controller, name: str, cpus: int, gpus: int = 0, extras: tuple[str, ...] = ()) -> Any:
    facts = infra_pb2.NodeFacts(
        name=name, cpu_count=cpus, memory_mib=8192, stage_kinds=["evaluate", "analyze"], extras=extras
    )
    for i in range(gpus):
        facts.gpus.add(index=i, name="fake")
    resp = await c.register(infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=name, facts=facts))
    return c.assignments(name, resp.session).__aiter__()


def _connect(stream: Any) -> asyncio.Future[Any]:
    """Open a node's command stream without reading it: the node is online, with nothing to run."""
    return asyncio.ensure_future(stream.__anext__())


async def _report(c: Controller, node: str, a: infra_pb2.Assignment, state: int) -> None:
    rep = infra_pb2.StageStatusReport(node_id=node, attempt_id=a.attempt_id, lease_token=a.lease_token, state=state)
    assert (await c.report_status(rep))[0]


async def _stages(c: Controller, key: str) -> dict[str, dict[str, Any]]:
    exp = (await c.read(store.status, c.engine, key, 1))[0]
    return {s["name"]: s for s in exp["stages"]}


async def _reason(c: Controller, key: str, stage: str, expected: str) -> dict[str, Any]:
    """The stage's row once its reason is ``expected`` (a pass and its commit take milliseconds)."""
    for _ in range(100):
        row = (await _stages(c, key))[stage]
        if row["reason"] == expected:
            return row
        await asyncio.sleep(0.02)
    raise AssertionError(f"{stage}: reason {row['reason']!r}, expected {expected!r}")


def _run(tmp_path: Path, scenario: Any) -> None:
    run_controller(tmp_path, scenario, heartbeat_interval=1, persist_interval=10)


def test_a_stage_no_node_can_take_names_what_is_missing(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("nowhere", [_stage("prepare")]))
        await _reason(c, key, "prepare", "waiting: no online node")
        await c.cancel(key, "")
        n1 = _connect(await _register(c, "n1", cpus=2))
        stages = [
            _stage("prepare"),
            _stage("analyze", "analyze", after=["prepare"]),
            _stage("train", after=["prepare"], resources={"cpus": 4}),
        ]
        key = await c.submit(_plan("home", stages))
        gpu = await c.submit(_plan("gpu", [_stage("g", resources={"gpus": 1})], shared=True))
        row = await _reason(
            c,
            key,
            "prepare",
            "waiting: no online node can run every stage of this experiment "
            "(stage analyze: missing extra 'oid'; stage train: needs 4 cpus, node n1 has 2)",
        )
        assert [t["to_state"] for t in row["transitions"]] == ["pending", "ready"]  # a reason is no transition
        await _reason(c, gpu, "g", "waiting: no online node can run this stage (needs 1 gpu, node n1 has 0)")

        writes: list[Any] = []
        submit = c.writer.submit
        c.writer.submit = lambda unit: writes.append(unit) or submit(unit)  # type: ignore[method-assign]
        for _ in range(3):  # the same reasons again: nothing is written
            c.wake()
            await asyncio.sleep(0.02)
        assert writes == []

        stream = await _register(c, "n2", cpus=4, gpus=1, extras=("oid",))  # can run everything
        placed = {(await _next(stream)).experiment for _ in range(2)}
        assert placed == {key, gpu} and not n1.done()
        stages_now = await _stages(c, key)
        assert stages_now["prepare"]["reason"] == "attempt 1 assigned to n2"
        assert [t["to_state"] for t in stages_now["prepare"]["transitions"]] == ["pending", "ready", "assigned"]

    _run(tmp_path, scenario)


def test_each_stage_fits_some_node_but_none_fits_all(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        streams = [
            _connect(await _register(c, "small", cpus=1, extras=("oid",))),
            _connect(await _register(c, "big", cpus=4)),
        ]
        key = await c.submit(_plan("split", [_stage("a", resources={"cpus": 4}), _stage("b", "analyze", after=["a"])]))
        await _reason(
            c,
            key,
            "a",
            "waiting: no online node can run every stage of this experiment "
            "(each stage fits some node, but no node fits all of them)",
        )
        assert not any(s.done() for s in streams)

    _run(tmp_path, scenario)


def test_busy_nodes_and_a_lost_home_node(tmp_path: Path) -> None:
    gpu = {"cpus": 1, "gpus": 1, "memory": 512}

    async def scenario(c: Controller) -> None:
        stream = await _register(c, "n1", cpus=2, gpus=1)  # a cpu stays free: a pass over full nodes stops at once
        home = await c.submit(_plan("home", [_stage("a", resources=gpu), _stage("b", after=["a"], resources=gpu)]))
        a = await _next(stream)
        other = await c.submit(_plan("other", [_stage("x", resources=gpu)], shared=True, priority=5))
        await _reason(c, other, "x", "waiting for resources: needs 1 gpu, 1 cpu, 512 MiB memory")
        await _report(c, "n1", a, infra_pb2.RUNNING)
        await _report(c, "n1", a, infra_pb2.SUCCEEDED)
        assert (await _next(stream)).stage == "x"  # higher priority: b waits for its home node
        await _reason(c, home, "b", "waiting for node n1: busy (needs 1 gpu, 0 free)")
        c.lost_timeout = 0.2  # n1 falls silent
        await _reason(
            c,
            home,
            "b",
            "waiting for node n1: it is lost (after --home-wait the experiment starts over on another node)",
        )

    _run(tmp_path, scenario)


# --- a real master and nodes -----------------------------------------------------------------

OID = {  # analyze needs the node extra oid (omegaid): no home node for the experiment, so prepare waits
    "name": "oid",
    "resources": {"cpus": 1, "memory": "256MiB"},
    "stages": [
        {"name": "prepare", "kind": "probe", "params": {"metrics": 1}},
        {"name": "analyze", "kind": "analyze", "after": ["prepare"], "params": {}},
    ],
}
CPUS = {
    "name": "cpus",
    "resources": {"cpus": 1, "memory": "256MiB"},
    "stages": [
        {"name": "prepare", "kind": "probe", "params": {"metrics": 1}},
        {"name": "train", "kind": "probe", "after": ["prepare"], "params": {"metrics": 1}, "resources": {"cpus": 4}},
    ],
}


@pytest.mark.timeout(180)
def test_status_says_why_a_plan_waits_until_a_node_that_fits_comes(cluster: Cluster) -> None:
    cluster.start_master()
    cluster.start_node("small", "--cpus", "2", "--memory", "2GiB", "--fake-gpus", "0")
    small = cluster.wait_online("small")["small"]
    if "oid" in small["extras"] or "analyze" not in small["stage_kinds"]:
        pytest.skip("this installation has omegaid (or lacks the probes verb): analyze would not wait")
    oid, cpus = cluster.submit(OID), cluster.submit(CPUS)

    def reason(key: str) -> str:
        return str(cluster.status(key)["experiments"][0]["stages"][0]["reason"])

    missing_extra = (
        "waiting: no online node can run every stage of this experiment (stage analyze: missing extra 'oid')"
    )
    cluster.wait_for(lambda: reason(oid) == missing_extra, 30, "the missing extra in the reason", interval=0.3)
    cpu_need = (
        "waiting: no online node can run every stage of this experiment (stage train: needs 4 cpus, node small has 2)"
    )
    cluster.wait_for(lambda: reason(cpus) == cpu_need, 30, "the cpu need in the reason", interval=0.3)

    cluster.start_node("big", "--cpus", "4", "--memory", "4GiB", "--fake-gpus", "0")
    exp = cluster.wait_finished(cpus)
    assert exp["state"] == "succeeded" and {s["node"] for s in exp["stages"]} == {"big"}
    prepare = exp["stages"][0]
    assert prepare["reason"].startswith("attempt 1 succeeded")
    assert [t["to"] for t in prepare["transitions"]] == ["pending", "ready", "assigned", "running", "succeeded"]
    assert reason(oid) == missing_extra  # neither node has oid
    cluster.cli("cancel", oid)
