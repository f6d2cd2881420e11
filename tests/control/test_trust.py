"""Issue 14, master side: trust under hostile or unlucky use. Driven through the controller (and its gRPC
servicers on loopback) on real SQLite and PostgreSQL databases."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from infra.master import store
from infra.master.controller import Controller
from infra.master.db import make_engine, migrate
from infra.master.errors import NotFound, Refused
from infra.master.models import Experiment, Stage
from infra.master.service import ClientServicer, NodeServicer
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc
from infra.spec.plan import MAX_STAGES, PlanError, validate_plan

from .conftest import Cluster
from .controller_kit import run_controller, started
from .test_controller import _next


def _stage(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": {"cpus": 1}, **kw}


def _plan(name: str, stages: list[dict[str, Any]], **kw: Any) -> str:
    return json.dumps({"name": name, "shared_workdir": True, "stages": stages} | kw)


def _chain(n: int, **first: Any) -> list[dict[str, Any]]:
    return [_stage("s0", **first)] + [_stage(f"s{i}", after=[f"s{i - 1}"]) for i in range(1, n)]


async def _register(c: Controller, name: str, cpus: int = 2) -> tuple[int, Any]:
    facts = infra_pb2.NodeFacts(name=name, cpu_count=cpus, memory_mib=8192, stage_kinds=["evaluate"])
    req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=name, facts=facts)
    session = (await c.register(req)).session
    return session, c.assignments(name, session).__aiter__()


async def _report(
    c: Controller, node: str, a: infra_pb2.Assignment, state: int, cls: int = 0, exit_code: int = 0
) -> tuple[bool, str]:
    rep = infra_pb2.StageStatusReport(
        node_id=node,
        attempt_id=a.attempt_id,
        lease_token=a.lease_token,
        state=state,
        failure_class=cls,  # type: ignore[arg-type]
        exit_code=exit_code,
    )
    return await c.report_status(rep)


async def _run_then(c: Controller, node: str, a: infra_pb2.Assignment, state: int, **kw: Any) -> None:
    assert (await _report(c, node, a, infra_pb2.RUNNING))[0]
    assert (await _report(c, node, a, state, **kw))[0]


async def _stages(c: Controller, key: str) -> dict[str, dict[str, Any]]:
    exp = (await c.read(store.status, c.engine, key, 1))[0]
    return {s["name"]: s for s in exp["stages"]}


async def _exp_state(c: Controller, key: str) -> str:
    return (await c.read(store.status, c.engine, key, 1))[0]["state"]


def _run(tmp_path: Path, db_url: str, scenario: Any, **kw: Any) -> None:
    run_controller(tmp_path, scenario, url=db_url, **{"heartbeat_interval": 0.1, "persist_interval": 10, **kw})


# --- 1. a long dependency chain ----------------------------------------------------------------------


def test_a_chain_as_long_as_the_plan_limit_fails_and_cancels_completely(tmp_path: Path, db_url: str) -> None:
    """A 1,000-stage chain whose first stage fails: every other stage cancelled, in memory and in the
    database; the failed stage keeps its exit code; cancel then says the experiment already failed."""

    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("chain", _chain(MAX_STAGES)))
        _, stream = await _register(c, "n1")
        a = await _next(stream)
        await _run_then(c, "n1", a, infra_pb2.FAILED, exit_code=3)
        assert key not in c.experiments and not c.ready and not c.nodes["n1"].attempts
        stages = await _stages(c, key)
        assert stages["s0"]["state"] == "failed" and stages["s0"]["attempt_rows"][0]["exit_code"] == 3
        assert stages["s0"]["attempt_rows"][0]["failure_class"] == "error"
        assert sum(s["state"] == "cancelled" for s in stages.values()) == MAX_STAGES - 1
        assert stages[f"s{MAX_STAGES - 1}"]["reason"] == f"dependency 's{MAX_STAGES - 2}' failed"
        assert await _exp_state(c, key) == "failed"
        assert await c.cancel(key, "") == (0, 0, "failed")

    _run(tmp_path, db_url, scenario)


def test_cancel_of_a_long_chain_cancels_every_stage(tmp_path: Path, db_url: str) -> None:
    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("chain", _chain(MAX_STAGES)))
        assert await c.cancel(key, "enough") == (MAX_STAGES, 0, "")
        stages = await _stages(c, key)
        assert {s["state"] for s in stages.values()} == {"cancelled"}
        assert await _exp_state(c, key) == "cancelled"
        assert await c.cancel(key, "again") == (0, 0, "cancelled")

    _run(tmp_path, db_url, scenario)


def test_a_restarted_master_repairs_a_pending_stage_whose_dependency_ended(tmp_path: Path, db_url: str) -> None:
    """The database an older master left: stage a failed, b still pending behind it, the experiment
    running. A new master cancels b (and what follows it) and the experiment fails."""

    async def main() -> None:
        engine = make_engine(db_url)
        migrate(engine)
        try:
            async with started(engine, heartbeat_interval=0.1) as c:
                key = await c.submit(_plan("repair", _chain(3)))
                _, stream = await _register(c, "n1")
                await _run_then(c, "n1", await _next(stream), infra_pb2.FAILED)
            with Session(engine) as s, s.begin():  # undo the cascade as the old RecursionError left it
                s.execute(update(Stage).where(Stage.name.in_(["s1", "s2"])).values(state="pending"))
                s.execute(update(Experiment).values(state="running", finished_at=None))
            async with started(engine, heartbeat_interval=0.1) as c:
                stages = await _stages(c, key)
                assert stages["s1"]["state"] == "cancelled" and "repaired at start" in stages["s1"]["reason"]
                assert stages["s2"]["state"] == "cancelled"
                assert await _exp_state(c, key) == "failed" and key not in c.experiments
        finally:
            engine.dispose()

    asyncio.run(main())


def test_a_handler_that_fails_half_way_leaves_memory_as_the_database_says(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("half", _chain(3)))
        _, stream = await _register(c, "n1")
        a = await _next(stream)
        assert (await _report(c, "n1", a, infra_pb2.RUNNING))[0]

        def broken(*args: Any) -> None:
            raise RuntimeError("a bug half-way through the change")

        with monkeypatch.context() as m:
            m.setattr(c.machine, "cascade_cancel", broken)
            with pytest.raises(RuntimeError):
                await _report(c, "n1", a, infra_pb2.FAILED, exit_code=7)
        exp = c.experiments[key]  # read back: the attempt still runs, as the database says
        assert [s.state for s in exp.stages] == ["running", "pending", "pending"]
        assert exp.stages[0].current is not None and exp.stages[0].current.state == "running"
        assert c.nodes["n1"].used_cpus == 1.0
        assert (await _stages(c, key))["s0"]["state"] == "running"
        assert await _report(c, "n1", a, infra_pb2.FAILED, exit_code=7) == (True, "")  # the node's retry
        stages = await _stages(c, key)
        assert stages["s0"]["state"] == "failed" and stages["s0"]["attempt_rows"][0]["exit_code"] == 7
        assert stages["s2"]["state"] == "cancelled" and key not in c.experiments
        assert c.nodes["n1"].used_cpus == 0.0

    _run(tmp_path, db_url, scenario)


# --- 6. database errors never reach a client ----------------------------------------------------------


def test_a_database_error_reaches_the_client_as_a_short_internal_error(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit whose commit fails: INTERNAL with a reference, no SQL text; nothing stays in memory and
    the experiment id is not used up."""
    real = store.create_experiment

    def failing(s: Session, *args: Any) -> None:
        real(s, *args)
        s.execute(text("SELECT secret_column FROM no_such_table"))  # a real database error, rolled back

    async def scenario(c: Controller) -> None:
        server = grpc.aio.server()
        infra_pb2_grpc.add_ClientServiceServicer_to_server(ClientServicer(c), server)
        infra_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(c), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                client = infra_pb2_grpc.ClientServiceStub(ch)
                monkeypatch.setattr(store, "create_experiment", failing)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.Submit(infra_pb2.SubmitRequest(plan_json=_plan("boom", [_stage("a")])))
                assert err.value.code() == grpc.StatusCode.INTERNAL
                detail = err.value.details() or ""
                assert "internal error in the master (ref " in detail
                assert "SELECT" not in detail and "no_such_table" not in detail and len(detail) < 100
                assert not c.experiments and not c.ready
                monkeypatch.setattr(store, "create_experiment", real)
                # the issue's input: a priority no column holds (PostgreSQL DataError, SQLite OverflowError);
                # a named plan error once the plan bounds its numbers, else a short INTERNAL
                huge = _plan("huge", [_stage("a")], priority=2**63)
                try:
                    resp = await client.Submit(infra_pb2.SubmitRequest(plan_json=huge))
                    assert resp.errors and not resp.experiment
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.INTERNAL and "INSERT" not in (e.details() or "")
                    assert len(e.details() or "") < 100
                assert not c.experiments
                ok = await client.Submit(infra_pb2.SubmitRequest(plan_json=_plan("fine", [_stage("a")])))
                assert ok.experiment == "fine-1"  # the failed submit's id was given back
                done = await client.Cancel(infra_pb2.CancelRequest(experiment="fine-1"))
                again = await client.Cancel(infra_pb2.CancelRequest(experiment="fine-1"))
                assert (done.cancelled, done.finished, again.cancelled, again.finished) == (1, "", 0, "cancelled")
        finally:
            await server.stop(None)

    _run(tmp_path, db_url, scenario)


# --- 7. failure classes and retry budgets ------------------------------------------------------------


def test_retry_budgets_per_failure_class_survive_a_master_restart(tmp_path: Path, db_url: str) -> None:
    """infra 1, preempted 1, error 0: an infra failure and a preemption are retried, each within its own
    budget; a restarted master counts what was spent from the attempts; the stage's own error ends it."""
    plan = _plan("budget", [_stage("a", retries={"infra": 1, "preempted": 1, "node_lost": 0})])

    async def main() -> None:
        engine = make_engine(db_url)
        migrate(engine)
        try:
            async with started(engine, heartbeat_interval=0.1) as c:
                key = await c.submit(plan)
                _, stream = await _register(c, "n1")
                a1 = await _next(stream)
                await _run_then(c, "n1", a1, infra_pb2.FAILED, cls=infra_pb2.FAILURE_INFRA)
                a2 = await _next(stream)
                assert a2.attempt == 2
            async with started(engine, heartbeat_interval=0.1) as c:
                assert c.experiments[key].stages[0].used == {"infra": 1}
                _, stream = await _register(c, "n1")
                await _report(c, "n1", a2, infra_pb2.RUNNING)
                await _report(c, "n1", a2, infra_pb2.FAILED, cls=infra_pb2.FAILURE_PREEMPTED)
                a3 = await _next(stream)
                await _run_then(c, "n1", a3, infra_pb2.FAILED, exit_code=1)  # UNSPECIFIED from a node: error
                stages = await _stages(c, key)
                classes = [a["failure_class"] for a in stages["a"]["attempt_rows"]]
                assert classes == ["infra", "preempted", "error"] and stages["a"]["state"] == "failed"
                reasons = [t["reason"] for t in stages["a"]["transitions"]]
                assert "attempt 1 failed (exit 0, infra); retry 1 of 1 (infra)" in reasons
                assert "attempt 2 failed (exit 0, preempted); retry 1 of 1 (preempted)" in reasons
                assert reasons[-1] == "attempt 3 failed (exit 1, error)"
        finally:
            engine.dispose()

    asyncio.run(main())


def test_a_lost_node_is_retried_without_spending_the_error_budget(tmp_path: Path, db_url: str) -> None:
    """max_retries 0 (the default): a node lost mid-stage is a machine fault, retried elsewhere; the
    default lost timeout is 12 heartbeats, long enough for an agent restart."""

    async def scenario(c: Controller) -> None:
        assert c.lost_timeout == pytest.approx(12 * c.heartbeat_interval)
        key = await c.submit(_plan("lost", [_stage("a", max_retries=0)]))
        s1, stream1 = await _register(c, "n1")
        a1 = await _next(stream1)
        assert (await _report(c, "n1", a1, infra_pb2.RUNNING))[0]
        s2, stream2 = await _register(c, "n2")
        for _ in range(8):  # 0.4 s of silence from n1 (3 heartbeats: the old timeout) is not lost
            c.heartbeat(infra_pb2.HeartbeatRequest(node_id="n2", session=s2))
            await asyncio.sleep(0.05)
        assert not c.nodes["n1"].lost
        while not c.nodes["n1"].lost:
            c.heartbeat(infra_pb2.HeartbeatRequest(node_id="n2", session=s2))
            await asyncio.sleep(0.05)
        a2 = await _next(stream2)
        assert (a2.stage, a2.attempt) == ("a", 2)
        await _run_then(c, "n2", a2, infra_pb2.SUCCEEDED)
        stages = await _stages(c, key)
        assert [a["failure_class"] for a in stages["a"]["attempt_rows"]] == ["node_lost", ""]
        assert any("retry 1 of 3 (node_lost)" in t["reason"] for t in stages["a"]["transitions"])
        assert await _exp_state(c, key) == "succeeded"

    _run(tmp_path, db_url, scenario)


def test_plan_retry_budgets_are_bounded_and_named() -> None:
    def errors(**kw: Any) -> list[str]:
        try:
            validate_plan({"name": "p", "stages": [_stage("a", **kw)]})
        except PlanError as e:
            return [str(i) for i in e.issues]
        return []

    plan = validate_plan({"name": "p", "retries": {"node_lost": 5}, "stages": [_stage("a", max_retries=2)]})
    assert plan.stages[0].retries == {"node_lost": 5, "preempted": 3, "infra": 2, "error": 2}
    assert validate_plan({"name": "p", "stages": [_stage("a")]}).stages[0].retries == {
        "node_lost": 3,
        "preempted": 3,
        "infra": 2,
        "error": 0,
    }
    assert errors(retries={"cancelled": 1}) == ["stages[0].retries.cancelled: unknown field (not allowed here)"]
    assert errors(retries={"error": 101}) == ["stages[0].retries.error: Input should be less than or equal to 100"]
    assert errors(retries={"infra": -1}) == ["stages[0].retries.infra: Input should be greater than or equal to 0"]
    assert errors(retries={"error": 1}, max_retries=2) == [
        "stages[0].max_retries: max_retries 2 disagrees with retries.error 1; give one of them"
    ]
    assert errors(retries={"error": 2}, max_retries=2) == []


# --- operator controls: drain and rerun ----------------------------------------------------------------


def test_a_drained_node_takes_no_new_work_survives_a_restart_and_preempts_after_its_deadline(
    tmp_path: Path, db_url: str
) -> None:
    async def main() -> None:
        engine = make_engine(db_url)
        migrate(engine)
        try:
            async with started(engine, heartbeat_interval=0.1, lost_timeout=30) as c:
                _, stream1 = await _register(c, "n1")
                waiting = asyncio.ensure_future(stream1.__anext__())  # the stream is open: n1 is online
                await c.drain("n1")
                key = await c.submit(_plan("drain", [_stage("a")]))
                await asyncio.sleep(0.2)
                assert c.experiments[key].stages[0].state == "ready" and not waiting.done()
                assert "take no new stages now (n1" in c.experiments[key].stages[0].reason
                waiting.cancel()
            async with started(engine, heartbeat_interval=0.1, lost_timeout=30) as c:
                assert c.nodes["n1"].drained  # persisted
                _, stream1 = await _register(c, "n1")
                assert c.nodes["n1"].drained
                await asyncio.sleep(0.2)
                assert c.experiments[key].stages[0].state == "ready"
                await c.drain("n1", undrain=True)
                a1 = await _next(stream1)
                assert (await _report(c, "n1", a1, infra_pb2.RUNNING))[0]
                _, stream2 = await _register(c, "n2")
                await c.drain("n1", deadline_s=0.3)
                cancel = await asyncio.wait_for(stream1.__anext__(), 5)  # the deadline passes: n1 told to stop it
                assert cancel.WhichOneof("command") == "cancel" and cancel.cancel.attempt_id == a1.attempt_id
                a2 = await _next(stream2)  # retried elsewhere within the preempted budget
                assert (a2.stage, a2.attempt) == ("a", 2)
                assert (await _report(c, "n1", a1, infra_pb2.CANCELLED))[0] is False  # fenced
                await _run_then(c, "n2", a2, infra_pb2.SUCCEEDED)
                stages = await _stages(c, key)
                assert [a["failure_class"] for a in stages["a"]["attempt_rows"]] == ["preempted", ""]
                assert "drained: its deadline passed" in stages["a"]["attempt_rows"][0]["message"]
        finally:
            engine.dispose()

    asyncio.run(main())


def test_rerun_of_a_finished_experiment_and_of_a_stage_keeps_the_old_attempts(tmp_path: Path, db_url: str) -> None:
    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("again", _chain(3)))
        _, stream = await _register(c, "n1")
        await _run_then(c, "n1", await _next(stream), infra_pb2.SUCCEEDED)
        await _run_then(c, "n1", await _next(stream), infra_pb2.FAILED, exit_code=2)
        assert await _exp_state(c, key) == "failed" and key not in c.experiments
        assert await c.rerun(key, "", "alice") == ["s1", "s2"]  # the failed stage and what follows
        s1 = await _next(stream)
        assert (s1.stage, s1.attempt) == ("s1", 2)
        await _run_then(c, "n1", s1, infra_pb2.SUCCEEDED)
        await _run_then(c, "n1", await _next(stream), infra_pb2.SUCCEEDED)
        assert await _exp_state(c, key) == "succeeded"
        with pytest.raises(Refused, match="nothing to rerun"):
            await c.rerun(key)
        assert await c.rerun(key, "s1") == ["s1", "s2"]  # a stage and everything after it
        s1 = await _next(stream)
        assert (s1.stage, s1.attempt) == ("s1", 3)
        with pytest.raises(Refused, match="still run"):
            await c.rerun(key, "s0")
        await _run_then(c, "n1", s1, infra_pb2.SUCCEEDED)
        await _run_then(c, "n1", await _next(stream), infra_pb2.SUCCEEDED)
        stages = await _stages(c, key)
        assert [a["number"] for a in stages["s1"]["attempt_rows"]] == [1, 2, 3]
        assert [a["state"] for a in stages["s1"]["attempt_rows"]] == ["failed", "succeeded", "succeeded"]
        assert any(t["reason"] == "rerun requested by alice" for t in stages["s1"]["transitions"])
        exp = (await c.read(store.status, c.engine, key, 1))[0]
        assert exp["state"] == "succeeded" and exp["finished_at"]
        with pytest.raises(NotFound, match=f"no stage {key}/nope"):
            await c.rerun(key, "nope")
        with pytest.raises(Refused, match="nothing to rerun"):
            await c.rerun(key)
        assert key not in c.experiments and not c.ready  # a refused rerun leaves a finished one out of memory

    _run(tmp_path, db_url, scenario)


# --- the same through the CLI, with a real master and agent ----------------------------------------------


def test_operator_commands_through_the_cli(cluster: Cluster) -> None:
    """cancel of a finished experiment, status --attempts, node list/drain/undrain, rerun."""
    cluster.start_master()
    cluster.start_node("w1")
    cluster.wait_online("w1")
    plan = {
        "name": "ops",
        "stages": [
            {"name": "a", "kind": "probe", "params": {"exit_code": 3, "metrics": 0}},
            {"name": "b", "kind": "probe", "after": ["a"], "params": {"metrics": 0}},
        ],
    }
    key = cluster.submit(plan)
    assert cluster.wait_finished(key)["state"] == "failed"
    assert cluster.cli("cancel", key).stdout.strip() == f"{key}: already finished (failed); nothing to cancel"

    text_out = cluster.cli("status", key, "--attempts").stdout
    assert "attempts" in text_out and "error" in text_out
    exp = json.loads(cluster.cli("status", key, "--attempts", "--json").stdout)["experiments"][0]
    (a1,) = exp["stages"][0]["attempts"]
    assert (a1["number"], a1["node"], a1["failure_class"], a1["exit_code"]) == (1, "w1", "error", 3)
    assert a1["started_at"] and a1["finished_at"]

    out = cluster.cli("node", "drain", "w1").stdout
    assert out.startswith("node w1: drained: takes no new stages")
    assert "drained" in cluster.cli("node", "list").stdout
    assert json.loads(cluster.cli("node", "list", "--json").stdout)[0]["drained"] is True
    assert cluster.cli("rerun", key).stdout.strip() == f"{key}: running again: a, b"
    time.sleep(1.0)
    exp = cluster.status(key)["experiments"][0]
    assert exp["state"] == "pending" and exp["stages"][0]["state"] == "ready"  # nothing goes to a drained node
    missing = cluster.cli("rerun", f"{key}/nope", check=False)
    assert missing.returncode == 1 and f"no stage {key}/nope" in missing.stderr
    cluster.cli("node", "undrain", "w1")
    exp = cluster.wait_finished(key)
    a = exp["stages"][0]
    assert [x["number"] for x in a["attempts"]] == [1, 2] and exp["state"] == "failed"
    assert not cluster.status()["nodes"][0]["drained"]


def test_commits_that_fail_leave_memory_as_the_database_says(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduling pass and a status report whose commits fail (the database refuses them) are undone in
    memory: the stage is ready again and the node's resources free; the report is refused, then applies."""
    failing = {"on": False, "count": 0}
    real_apply = store.Changes.apply

    def apply(self: store.Changes, s: Session) -> None:
        if failing["on"]:
            failing["count"] += 1
            s.execute(text("SELECT * FROM no_such_table"))
        real_apply(self, s)

    async def scenario(c: Controller) -> None:
        key = await c.submit(_plan("refused", _chain(2)))
        monkeypatch.setattr(store.Changes, "apply", apply)
        failing["on"] = True
        _, stream = await _register(c, "n1")
        first = asyncio.ensure_future(_next(stream))
        st = c.experiments[key].stages[0]
        for _ in range(100):
            await asyncio.sleep(0.05)
            now = c.experiments[key].stages[0]
            if failing["count"] and now is not st and now.state == "ready":
                break
        exp = c.experiments[key]  # read back
        assert failing["count"] >= 1 and exp.stages[0].state == "ready" and exp.stages[0].attempts == 0
        assert c.nodes["n1"].used_cpus == 0.0 and not c.nodes["n1"].attempts and not first.done()
        failing["on"] = False
        a = await asyncio.wait_for(first, 5)
        assert a.attempt == 1
        failing["on"] = True
        with pytest.raises(Exception, match="no_such_table"):
            await _report(c, "n1", a, infra_pb2.RUNNING)
        st = c.experiments[key].stages[0]
        assert st.state == "assigned" and st.current is not None and st.current.state == "assigned"
        assert c.nodes["n1"].used_cpus == 1.0
        failing["on"] = False
        await _run_then(c, "n1", a, infra_pb2.SUCCEEDED)
        b = await _next(stream)
        await _run_then(c, "n1", b, infra_pb2.SUCCEEDED)
        stages = await _stages(c, key)
        assert [len(s["attempt_rows"]) for s in stages.values()] == [1, 1]
        assert await _exp_state(c, key) == "succeeded"

    _run(tmp_path, db_url, scenario, lost_timeout=30)


def test_a_1000_stage_chain_through_a_real_master_and_agent(cluster: Cluster) -> None:
    """The issue's reproduction: 1,000 stages, each after the previous, the first fails. Over gRPC, with a
    real agent; then the master is restarted and nothing changes; cancel says it already failed."""
    cluster.start_master()
    cluster.start_node("w1")
    cluster.wait_online("w1")
    stages = [{"name": "s0", "kind": "probe", "params": {"exit_code": 5, "metrics": 0}}]
    stages += [{"name": f"s{i}", "kind": "probe", "after": [f"s{i - 1}"]} for i in range(1, MAX_STAGES)]
    key = cluster.submit({"name": "chain", "stages": stages})
    exp = cluster.wait_finished(key)
    assert exp["state"] == "failed"
    first, rest = exp["stages"][0], exp["stages"][1:]
    assert first["state"] == "failed" and first["attempts"][0]["exit_code"] == 5
    assert len(rest) == MAX_STAGES - 1 and {s["state"] for s in rest} == {"cancelled"}
    cluster.kill_master()
    cluster.restart_master()
    assert cluster.cli("cancel", key).stdout.strip() == f"{key}: already finished (failed); nothing to cancel"
    again = cluster.status(key)["experiments"][0]
    assert again["state"] == "failed" and {s["state"] for s in again["stages"][1:]} == {"cancelled"}
