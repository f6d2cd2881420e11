"""Gangs (a stage with ``resources.nodes`` K > 1), driven through the node protocol on a real SQLite master:
the plan rules, all-or-nothing placement with its waiting reason, one rendezvous per attempt, a failing member
ending the whole gang as one attempt, and a master restart in the middle of a gang."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from infra.cli import main
from infra.master import store
from infra.master.controller import Controller
from infra.master.db import make_engine, migrate
from infra.protos import PROTOCOL_VERSION, infra_pb2
from infra.spec.plan import PlanError, validate_plan
from infra.spec.stages import Rendezvous, torchrun

from .controller_kit import WiredController, client_api, run_controller
from .test_waiting_reason import _reason, _stages

SMALL = {"gpus": 0, "cpus": 1, "memory": 512}
PORTS = (29400, 29401)


def _plan(name: str, stages: list[dict[str, Any]], shared: bool = True) -> str:
    return json.dumps({"name": name, "shared_workdir": shared, "stages": stages})


def _train(name: str = "train", nodes: int = 2, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "train", "resources": {**SMALL, "nodes": nodes}, **kw}


def _job(name: str) -> dict[str, Any]:
    return {"name": name, "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": SMALL}


class _Stream:
    """A node's command stream, open from registration on (a node is schedulable only while it is open), read
    into a queue by a task of its own."""

    def __init__(self, stream: Any) -> None:
        self.commands: asyncio.Queue[infra_pb2.NodeCommand] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: Any) -> None:
        async for command in stream:
            self.commands.put_nowait(command)


async def _register(
    c: Controller, name: str, cpus: int = 1, running: Sequence[infra_pb2.Assignment] = (), address: str = "10.0.0."
) -> _Stream:
    facts = infra_pb2.NodeFacts(name=name, cpu_count=cpus, memory_mib=4096, stage_kinds=["train", "evaluate"])
    facts.advertise_address = address + name[1:] if address.endswith(".") else address
    held = [infra_pb2.RunningAttempt(attempt_id=a.attempt_id, lease_token=a.lease_token) for a in running]
    req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=name, facts=facts, running=held)
    stream = _Stream(c.assignments(name, (await c.register(req)).session))
    for _ in range(100):
        if c.nodes[name].queue is not None:
            return stream
        await asyncio.sleep(0.01)
    raise AssertionError(f"the command stream of {name} did not open")


async def _command(stream: _Stream) -> infra_pb2.NodeCommand:
    return await asyncio.wait_for(stream.commands.get(), 5)


async def _assign(stream: _Stream) -> infra_pb2.Assignment:
    cmd = await _command(stream)
    assert cmd.WhichOneof("command") == "assign", cmd
    return cmd.assign


async def _report(c: Controller, node: str, a: infra_pb2.Assignment, state: int, cls: int = 0) -> tuple[bool, str]:
    rep = infra_pb2.StageStatusReport(
        node_id=node, attempt_id=a.attempt_id, lease_token=a.lease_token, state=state, failure_class=cls
    )
    return await c.report_status(rep)


def _run(tmp_path: Path, scenario: Any) -> None:
    run_controller(tmp_path, scenario, rendezvous_ports=PORTS)


# --- plan rules ------------------------------------------------------------------------------------


def _issues(plan: dict[str, Any]) -> list[str]:
    with pytest.raises(PlanError) as e:
        validate_plan(plan)
    return [str(i) for i in e.value.issues]


def test_a_multi_node_stage_needs_a_shared_workdir_a_train_kind_and_bounded_nodes() -> None:
    ok = validate_plan(json.loads(_plan("g", [_train()])))
    assert ok.stages[0].resources.nodes == 2 and ok.to_dict()["stages"][0]["resources"]["nodes"] == 2
    assert validate_plan(json.loads(_plan("one", [_job("e")], shared=False))).stages[0].resources.nodes == 1
    (issue,) = _issues(json.loads(_plan("g", [_train()], shared=False)))
    assert issue.startswith("shared_workdir: stage 'train' runs on 2 nodes (stages[0].resources.nodes)")
    assert _issues(json.loads(_plan("g", [{**_job("e"), "resources": {"nodes": 2}}]))) == [
        "stages[0].resources.nodes: kind 'evaluate' runs on one node; only train runs on several"
    ]
    for bad in (0, 65, "2"):
        (issue,) = _issues(json.loads(_plan("g", [_train(nodes=bad)])))
        assert issue.startswith("stages[0].resources.nodes: ")
    accum = _train(resources={**SMALL, "nodes": 2, "processes": 2}, params={"overrides": {"grad_accum": 6}})
    assert _issues(json.loads(_plan("g", [accum]))) == [
        "stages[0].params.overrides.grad_accum: grad_accum 6 counts micro-batches over all 4 processes on 2 nodes "
        "and must be a multiple of 4"
    ]


def test_a_gang_member_s_command_line_is_torchrun_s_static_rendezvous() -> None:
    argv = ["py", "-m", "crystallm_core.cli", "train", "t.json"]
    z = Rendezvous("10.0.0.1:29400", 2, 1, "exp.train.1")
    assert torchrun(1, argv, z) == [
        *("py", "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", "1", "--rdzv-id", "exp.train.1"),
        *("--master-addr", "10.0.0.1", "--master-port", "29400", "--nproc-per-node", "1"),
        *("-m", "crystallm_core.cli", "train", "t.json"),
    ]
    assert torchrun(1, argv) == argv
    assert torchrun(2, argv, Rendezvous("[fd00::1]:29401", 3, 0, "r"))[9:14] == [
        "--master-addr",
        "fd00::1",
        "--master-port",
        "29401",
        "--nproc-per-node",
    ]


# --- placement -------------------------------------------------------------------------------------


def test_a_gang_is_placed_on_k_nodes_at_once_or_waits_holding_nothing(tmp_path: Path) -> None:
    """One of two nodes is busy: the gang waits and says what it lacks, holds nothing, and the free node runs
    a one-node stage meanwhile; once two nodes are free, both members go out together with one rendezvous."""

    async def scenario(c: Controller) -> None:
        n1, n2 = await _register(c, "n1"), await _register(c, "n2")
        busy_key = await c.submit(_plan("busy", [_job("e")]))
        busy = await _assign(n1)
        gang_key = await c.submit(_plan("gang", [_train()]))
        row = await _reason(c, gang_key, "train", "waiting for 2 nodes with 1 cpu, 512 MiB memory free each: 1 has")
        assert row["state"] == "ready" and row["attempt_rows"] == []
        assert c.nodes["n2"].used_cpus == 0 and not c.nodes["n2"].attempts  # holds nothing while it waits
        other = await c.submit(_plan("other", [_job("e")]))  # the free node still runs a one-node stage
        mid = await _assign(n2)
        assert mid.experiment == other
        await _report(c, "n2", mid, infra_pb2.SUCCEEDED)
        await _reason(c, gang_key, "train", "waiting for 2 nodes with 1 cpu, 512 MiB memory free each: 1 has")
        assert (await _report(c, "n1", busy, infra_pb2.SUCCEEDED))[0] and busy.experiment == busy_key
        a1, a2 = await _assign(n1), await _assign(n2)
        members = sorted([a1, a2], key=lambda a: a.rendezvous.node_rank)
        first = "n1" if members[0] is a1 else "n2"
        assert [m.rendezvous.node_rank for m in members] == [0, 1]
        assert {m.rendezvous.endpoint for m in members} == {f"10.0.0.{first[1:]}:29400"}
        assert {m.rendezvous.nnodes for m in members} == {2} and {m.resources.nodes for m in members} == {2}
        assert members[0].rendezvous.run_id == members[1].rendezvous.run_id == f"{gang_key}.train.1"
        assert (a1.attempt, a2.attempt) == (1, 1) and a1.attempt_id != a2.attempt_id
        assert c.nodes[first].ports == {29400}
        rows = (await _stages(c, gang_key))["train"]["attempt_rows"]
        assert sorted((r["number"], r["rank"]) for r in rows) == [(1, 0), (1, 1)]
        await _report(c, "n1", a1, infra_pb2.RUNNING)
        assert (await _stages(c, gang_key))["train"]["state"] == "assigned"  # running once every member runs
        await _report(c, "n2", a2, infra_pb2.RUNNING)
        assert (await _stages(c, gang_key))["train"]["state"] == "running"
        await _report(c, "n1", a1, infra_pb2.SUCCEEDED)
        assert (await _stages(c, gang_key))["train"]["state"] == "running"
        await _report(c, "n2", a2, infra_pb2.SUCCEEDED)
        assert (await _stages(c, gang_key))["train"]["state"] == "succeeded"
        assert not c.nodes["n1"].ports and not c.nodes["n2"].ports

    _run(tmp_path, scenario)


def test_two_gangs_never_hold_half_each(tmp_path: Path) -> None:
    """Three nodes, two gangs of two: the first takes two nodes, the second waits holding nothing (the third
    node stays free for anything else), then runs when the first ends."""

    async def scenario(c: Controller) -> None:
        streams = {n: await _register(c, n) for n in ("n1", "n2", "n3")}
        first = await c.submit(_plan("first", [_train()]))
        second = await c.submit(_plan("second", [_train()]))
        await _reason(c, second, "train", "waiting for 2 nodes with 1 cpu, 512 MiB memory free each: 1 has")
        held = {n: node.used_cpus for n, node in c.nodes.items()}
        assert sorted(held.values()) == [0, 1, 1]
        got = {}
        for n, node in c.nodes.items():
            if node.used_cpus:
                got[n] = await _assign(streams[n])
        assert {a.experiment for a in got.values()} == {first}
        for n, a in got.items():
            await _report(c, n, a, infra_pb2.SUCCEEDED)
        for _ in range(100):
            if sum(1 for node in c.nodes.values() if node.used_cpus) == 2:
                break
            await asyncio.sleep(0.02)
        out = [await _assign(streams[n]) for n, node in c.nodes.items() if node.used_cpus]
        assert len(out) == 2 and {a.experiment for a in out} == {second}

    _run(tmp_path, scenario)


def test_a_node_without_an_address_takes_no_part_in_gangs(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        await _register(c, "n1")
        await _register(c, "n2", address="")
        key = await c.submit(_plan("gang", [_train()]))
        await _reason(
            c,
            key,
            "train",
            "waiting: needs 2 nodes that can run it together, 1 online; 1 advertises no address "
            "(infra node --advertise-address)",
        )

    _run(tmp_path, scenario)


# --- failure and restart ---------------------------------------------------------------------------


Gang = dict[int, tuple[str, infra_pb2.Assignment, _Stream]]


async def _running_gang(c: Controller, key: str, streams: dict[str, _Stream]) -> Gang:
    """The gang's members come on the nodes' streams and both report RUNNING. By rank: (node, member,
    stream)."""
    got = {n: await _assign(s) for n, s in streams.items()}
    for n, m in got.items():
        await _report(c, n, m, infra_pb2.RUNNING)
    assert (await _stages(c, key))["train"]["state"] == "running"
    return {m.rendezvous.node_rank: (n, m, streams[n]) for n, m in got.items()}


async def _two_nodes(c: Controller) -> dict[str, _Stream]:
    return {n: await _register(c, n) for n in ("n1", "n2")}


async def _stop_of(stream: _Stream, m: infra_pb2.Assignment) -> str:
    stop = await _command(stream)
    assert stop.WhichOneof("command") == "cancel" and stop.cancel.attempt_id == m.attempt_id, stop
    return str(stop.cancel.reason)


async def _lose(c: Controller, node: str) -> None:
    """``node`` falls silent past the lost timeout and the master's check declares it lost."""
    c.nodes[node].last_heartbeat = time.time() - 10 * c.lost_timeout
    await c.registry.check_nodes()


def _retried(st: dict[str, Any]) -> list[str]:
    return [t["reason"] for t in st["transitions"] if t["to_state"] == "ready" and t["attempt_id"]]


def _members(st: dict[str, Any], number: int = 1) -> list[tuple[int, str, str]]:
    return sorted((r["rank"], r["state"], r["failure_class"]) for r in st["attempt_rows"] if r["number"] == number)


def test_a_failing_member_stops_the_others_and_the_gang_is_decided_once_all_have_ended(tmp_path: Path) -> None:
    """Member 1 fails (error); member 0 is stopped and reports cancelled, which does not vote: one attempt of
    class error, charged once per gang."""

    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train(retries={"error": 1})]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, s0), (node1, m1, _) = gang[0], gang[1]
        assert await _report(c, node1, m1, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR) == (True, "")
        assert "member 1 of the gang" in await _stop_of(s0, m0)
        st = (await _stages(c, key))["train"]
        assert st["state"] == "running" and st["reason"].startswith(f"attempt 1 stopping: member 1 on {node1} failed")
        assert st["reason"].endswith(f"; stopping the other member on {node0}")
        assert _members(st) == [(0, "running", ""), (1, "failed", "error")] and not _retried(st)
        assert c.nodes[node1].used_cpus == 0 and c.nodes[node0].used_cpus == 1  # nothing placed meanwhile
        assert await _report(c, node0, m0, infra_pb2.CANCELLED) == (True, "")
        a, b = await _assign(streams["n1"]), await _assign(streams["n2"])
        st = (await _stages(c, key))["train"]
        (retried,) = _retried(st)
        assert retried.startswith(f"attempt 1: member 1 on {node1} failed (exit 0, error)")
        assert retried.endswith(f"; stopped the other member on {node0}; retry 1 of 1 (error)")
        assert _members(st) == [(0, "cancelled", "cancelled"), (1, "failed", "error")]
        assert (a.attempt, b.attempt) == (2, 2) and a.rendezvous.run_id.endswith(".2")
        await _report(c, "n1", a, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _report(c, "n2", b, infra_pb2.CANCELLED)
        assert (await _stages(c, key))["train"]["state"] == "failed"  # the budget was one gang attempt

    _run(tmp_path, scenario)


def test_a_member_s_lost_node_outweighs_the_error_of_a_member_it_broke(tmp_path: Path) -> None:
    """Member 0's collectives break (error) before member 1's node is declared lost: the gang is one attempt
    of class node_lost, and the error budget (0) is untouched."""

    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train()]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, _), (node1, m1, s1) = gang[0], gang[1]
        await _report(c, node0, m0, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _stop_of(s1, m1)
        assert (await _stages(c, key))["train"]["state"] == "running"
        await _lose(c, node1)
        st = (await _stages(c, key))["train"]
        (retried,) = _retried(st)
        assert retried.startswith(f"attempt 1: member 1 on {node1} failed (exit -1, node_lost): node {node1} lost")
        assert f"; member 0 on {node0} failed (exit 0, error)" in retried
        assert retried.endswith("; retry 1 of 3 (node_lost)")
        assert st["state"] == "ready" and _members(st) == [(0, "failed", "error"), (1, "failed", "node_lost")]
        st = c.state.experiments[key].stages[0]
        assert st.used == {"node_lost": 1}
        snap = await c.commit(lambda s: store.load_experiment(s, key))  # what a restarted master counts
        assert snap.used == {st.id: {"node_lost": 1}}

    _run(tmp_path, scenario)


def test_preempted_outweighs_error(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train()]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, _), (node1, m1, _) = gang[0], gang[1]
        await _report(c, node0, m0, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _report(c, node1, m1, infra_pb2.FAILED, infra_pb2.FAILURE_PREEMPTED)
        (retried,) = _retried((await _stages(c, key))["train"])
        assert retried.startswith(f"attempt 1: member 1 on {node1} failed (exit 0, preempted)")
        assert retried.endswith("; retry 1 of 3 (preempted)")

    _run(tmp_path, scenario)


def test_a_cancel_while_the_gang_is_ending_is_a_cancel(tmp_path: Path) -> None:
    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train(retries={"error": 1})]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, _), (node1, m1, s1) = gang[0], gang[1]
        await _report(c, node0, m0, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _stop_of(s1, m1)
        await c.cancel(key, "enough")
        await _report(c, node1, m1, infra_pb2.CANCELLED)
        st = (await _stages(c, key))["train"]
        assert st["state"] == "cancelled" and not _retried(st) and "retry" not in st["reason"]
        assert (await c.read(store.experiment_state, c.engine, key)) == "cancelled"

    _run(tmp_path, scenario)


def test_a_restarted_master_restores_a_running_gang(tmp_path: Path) -> None:
    async def main() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
        migrate(engine)
        c = WiredController(engine, heartbeat_interval=1, rendezvous_ports=PORTS)
        await c.start()
        key = await c.submit(_plan("g", [_train()]))
        n1, n2 = await _register(c, "n1"), await _register(c, "n2")
        a, b = await _assign(n1), await _assign(n2)
        await _report(c, "n1", a, infra_pb2.RUNNING)
        await _report(c, "n2", b, infra_pb2.RUNNING)
        host = "n1" if a.rendezvous.node_rank == 0 else "n2"
        await c.stop()

        c = WiredController(engine, heartbeat_interval=1, rendezvous_ports=PORTS)
        await c.start()
        try:
            assert c.nodes[host].ports == {29400}  # the port stays held while the gang runs
            assert c.nodes["n1"].used_cpus == c.nodes["n2"].used_cpus == 1
            n1 = await _register(c, "n1", running=[a])
            n2 = await _register(c, "n2", running=[b])
            assert await _report(c, "n1", a, infra_pb2.SUCCEEDED) == (True, "")
            assert (await _stages(c, key))["train"]["state"] == "running"
            assert await _report(c, "n2", b, infra_pb2.FAILED, infra_pb2.FAILURE_NODE_LOST) == (True, "")
            a2, b2 = await _assign(n1), await _assign(n2)
            assert (a2.attempt, b2.attempt) == (2, 2)
            assert {a2.rendezvous.endpoint, b2.rendezvous.endpoint} == {b2.rendezvous.endpoint}
        finally:
            await c.stop()
            engine.dispose()

    asyncio.run(main())


def test_rendezvous_ports_and_the_default_advertise_address() -> None:
    from infra.master.config import port_range
    from infra.node.facts import route_address

    assert port_range("29400-29999") == (29400, 29999) and port_range("29500") == (29500, 29500)
    for bad in ("29999-29400", "80-90", "a-b", "29400-70000"):
        with pytest.raises(ValueError, match="rendezvous ports"):
            port_range(bad)
    assert route_address("127.0.0.1:50051") == "127.0.0.1"  # the route to a master on loopback
    assert route_address("no-such-host.invalid:50051") == ""


def test_a_restarted_master_finishes_deciding_an_ending_gang(db_url: str) -> None:
    """The master stops after member 0 failed (error) and before member 1 ended: the restarted master tells
    member 1's node to stop it again, nothing is charged until it ends, and then the gang counts once (the
    budget spent is read back by a query of its own, hence both databases)."""

    async def main() -> None:
        engine = make_engine(db_url)
        migrate(engine)
        c = WiredController(engine, heartbeat_interval=1, rendezvous_ports=PORTS)
        await c.start()
        key = await c.submit(_plan("g", [_train(retries={"error": 1})]))
        gang = await _running_gang(c, key, await _two_nodes(c))
        (node0, m0, _), (node1, m1, s1) = gang[0], gang[1]
        await _report(c, node0, m0, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _stop_of(s1, m1)
        await c.stop()

        c = WiredController(engine, heartbeat_interval=1, rendezvous_ports=PORTS)
        await c.start()
        try:
            st = c.state.experiments[key].stages[0]
            assert st.state == "running" and st.used == {}  # undecided: nothing spent yet
            assert c.nodes[node1].used_cpus == 1 and c.nodes[node0].used_cpus == 0
            streams = {node0: await _register(c, node0), node1: await _register(c, node1, running=[m1])}
            assert "member 0 of the gang" in await _stop_of(streams[node1], m1)  # the Stop is sent again
            assert await _report(c, node1, m1, infra_pb2.CANCELLED) == (True, "")
            a, b = await _assign(streams["n1"]), await _assign(streams["n2"])
            (retried,) = _retried((await _stages(c, key))["train"])
            assert retried.startswith(f"attempt 1: member 0 on {node0} failed (exit 0, error)")
            assert retried.endswith("; retry 1 of 1 (error)")  # charged once, after the restart
            assert (a.attempt, b.attempt) == (2, 2)
        finally:
            await c.stop()
            engine.dispose()

    asyncio.run(main())


def _beat(c: Controller, node: str, running: Sequence[infra_pb2.Assignment]) -> None:
    req = infra_pb2.HeartbeatRequest(node_id=node, session=c.nodes[node].session)
    for a in running:
        req.running.add(attempt_id=a.attempt_id, lease_token=a.lease_token)
    assert not c.heartbeat(req).reregister


def test_a_member_never_ended_by_its_live_node_is_cancelled_after_the_lost_timeout(tmp_path: Path) -> None:
    """The wait for every member is bounded: a node that heartbeats but does not end its stopped member
    within the lost timeout has it cancelled by the master (no vote); a node silent since the Stop is left to
    the lost timeout (twice it, for a node not heard from since the master started), whose node_lost votes."""

    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train()]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, _), (node1, m1, s1) = gang[0], gang[1]
        await _report(c, node0, m0, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _stop_of(s1, m1)
        stopping = c.state.stopping[m1.attempt_id]
        stopping.stop_at = (stopping.stop_at or 0) - 2 * c.lost_timeout  # the Stop was sent long ago
        c.nodes[node1].last_heartbeat = None  # not heard from since this master started, as after a restart
        await c.registry.check_nodes()
        assert stopping.state == "running" and not c.nodes[node1].lost  # silent: for the lost timeout to decide
        _beat(c, node1, [m1])  # alive, still running it
        await c.registry.check_nodes()
        st = (await _stages(c, key))["train"]
        assert st["state"] == "failed" and _members(st) == [(0, "failed", "error"), (1, "cancelled", "cancelled")]
        row = next(r for r in st["attempt_rows"] if r["rank"] == 1)
        assert row["message"].endswith(f"not ended by its node within {c.lost_timeout:g}s, cancelled by the master")
        assert (
            st["reason"]
            == f"attempt 1: member 0 on {node0} failed (exit 0, error); stopped the other member on {node1}"
        )

    _run(tmp_path, scenario)


def test_a_stopped_member_gone_from_its_node_s_heartbeat_does_not_vote(tmp_path: Path) -> None:
    """A node that drops a stopped member (its report lost with the agent) has it ended as cancelled, not as
    node_lost, which would charge the gang to a machine fault."""

    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train()]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, _), (node1, m1, s1) = gang[0], gang[1]
        _beat(c, node1, [m1])
        await _report(c, node0, m0, infra_pb2.FAILED, infra_pb2.FAILURE_ERROR)
        await _stop_of(s1, m1)
        _beat(c, node1, [])
        for _ in range(100):
            st = (await _stages(c, key))["train"]
            if st["state"] != "running":
                break
            await asyncio.sleep(0.02)
        assert st["state"] == "failed" and _members(st) == [(0, "failed", "error"), (1, "cancelled", "cancelled")]

    _run(tmp_path, scenario)


# --- a member's logs and metrics ----------------------------------------------------------------------


def _events(m: infra_pb2.Assignment, first: int, *bodies: infra_pb2.LogLine | infra_pb2.Metric) -> list[Any]:
    """Events of member ``m`` from seq ``first`` on: a log line or a metric each."""
    out = []
    for seq, body in enumerate(bodies, first):
        ev = infra_pb2.Event(attempt_id=m.attempt_id, lease_token=m.lease_token, seq=seq, time=time.time())
        (ev.log if isinstance(body, infra_pb2.LogLine) else ev.metric).CopyFrom(body)
        out.append(ev)
    return out


async def _infra(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """An ``infra`` verb, run off the loop that serves it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_member_s_logs_and_metrics_come_back_with_member(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both members log and report a metric (each with its own seqs): ``--member 1`` shows member 1's, the
    default member 0's, ``-f --member 1`` follows member 1 until the gang ends; a member past the gang's size
    and a member of a plain stage are refused by name."""

    async def scenario(c: Controller) -> None:
        streams = await _two_nodes(c)
        key = await c.submit(_plan("g", [_train(), _job("plain")]))
        gang = await _running_gang(c, key, streams)
        (node0, m0, _), (node1, m1, _) = gang[0], gang[1]
        for node, m, rank in ((node0, m0, 0), (node1, m1, 1)):
            line = infra_pb2.LogLine(stream="stdout", text=f"hello from member {rank}")
            metric = infra_pb2.Metric(step=10 + rank, values={"loss": 1.5 + rank})
            batch = infra_pb2.EventBatch(node_id=node, events=_events(m, 1, line, metric))
            assert await c.report_events(batch) == (2, [])
        async with client_api(c) as address:
            run = ("--master", address)
            assert await _infra(capsys, *run, "logs", f"{key}/train", "--member", "1") == (
                0,
                "hello from member 1\n",
                "",
            )
            assert (await _infra(capsys, *run, "logs", f"{key}/train"))[1] == "hello from member 0\n"
            code, out, _ = await _infra(capsys, *run, "--json", "metrics", f"{key}/train", "--member", "1")
            assert code == 0 and [(r["step"], r["values"]) for r in json.loads(out)] == [(11, {"loss": 2.5})]
            code, out, _ = await _infra(capsys, *run, "--json", "metrics", f"{key}/train")
            assert code == 0 and [(r["step"], r["values"]) for r in json.loads(out)] == [(10, {"loss": 1.5})]

            code, out, err = await _infra(capsys, *run, "logs", f"{key}/train", "--member", "2")
            assert code == 1 and not out
            assert "member: stage train is a gang of 2 members (0 to 1); there is no member 2" in err
            code, _, err = await _infra(capsys, *run, "metrics", f"{key}/plain", "--member", "1")
            assert code == 1 and "member: stage plain is not a gang" in err
            assert (await _infra(capsys, *run, "logs", f"{key}/plain", "--member", "0"))[0] == 0

            follow = asyncio.ensure_future(_infra(capsys, *run, "logs", "-f", f"{key}/train", "--member", "1"))
            later = infra_pb2.LogLine(stream="stderr", text="member 1 again")
            assert await c.report_events(infra_pb2.EventBatch(node_id=node1, events=_events(m1, 3, later))) == (1, [])
            await _report(c, node0, m0, infra_pb2.SUCCEEDED)
            await _report(c, node1, m1, infra_pb2.SUCCEEDED)
            assert (await _stages(c, key))["train"]["state"] == "succeeded"
            code, out, _ = await asyncio.wait_for(follow, 10)
            assert code == 0 and out == "hello from member 1\n[stderr] member 1 again\n"

    _run(tmp_path, scenario)
