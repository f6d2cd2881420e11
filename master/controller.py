"""The master's logic: registration, the stage state machine, scheduling, cancel, event intake.

Runs on the server's asyncio loop and owns the in-memory state (``master/state.py``); every change
becomes a :class:`~master.store.Changes` unit committed by the writer thread, in order. A reply
that acknowledges a change is sent only once the change is committed.

Stage states: pending -> ready -> assigned -> running -> succeeded | failed | cancelled, plus
running/assigned -> ready when a failed attempt has retries left (a node declared lost fails its
attempts), pending/ready -> cancelled (cancel, or a dependency failed), and succeeded -> ready/pending
when an experiment without a shared workdir loses its home node for good and starts over elsewhere, or
an operator reruns it. Every change is a row in ``transitions`` with time and reason.

Every attempt that does not succeed ends with a failure class (``node_lost``, ``preempted``,
``cancelled``, ``error``, ``infra``) and is retried only while the stage's budget for that class lasts,
so that a machine fault never spends the budget of the stage's own code (``error``).

Memory and database never disagree for long: a handler changes memory and commits the change as one
unit (:meth:`Controller._apply`); when building or committing it fails, the experiment is read back
from the database (after everything queued before it) and memory is rebuilt from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any, TypeVar

from google.protobuf.json_format import MessageToDict
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from infra.master import store
from infra.master.state import (
    ACTIVE,
    ASSIGNED,
    CANCELLED,
    FAILED,
    PENDING,
    READY,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    AttemptRt,
    ExperimentRt,
    NodeRt,
    StageRt,
)
from infra.master.store import Changes
from infra.master.writer import Writer
from infra.protos import PROTOCOL_VERSION, infra_pb2
from infra.spec.plan import DEFAULT_RETRIES, Plan, parse_plan_text, validate_plan
from infra.spec.stages import Resources, get_stage_kind, stage_kinds

T = TypeVar("T")
log = logging.getLogger("infra.master")
STATE_NAMES = {v: k.lower() for k, v in infra_pb2.StageState.items() if v}
# failure classes as nodes report them; an older node's UNSPECIFIED (or ERROR) on FAILED is the stage's own error
FAILURE_CLASSES = {
    infra_pb2.FAILURE_NODE_LOST: "node_lost",
    infra_pb2.FAILURE_PREEMPTED: "preempted",
    infra_pb2.FAILURE_CANCELLED: "cancelled",
    infra_pb2.FAILURE_INFRA: "infra",
}
NODE_LOST, PREEMPTED, CANCELLED_CLASS, ERROR, INFRA = "node_lost", "preempted", "cancelled", "error", "infra"
LOST_HEARTBEATS = 12  # the default lost timeout, in heartbeat intervals (docs/RELIABILITY.md says why)
MAX_PLACEMENTS = 500  # per scheduling pass


class ProtocolMismatch(Exception):
    pass


class NotFound(Exception):
    pass


class Refused(Exception):
    """A request that cannot be done in the current state (the message says why)."""


def _budgets(retries: dict[str, int] | None, max_retries: int) -> dict[str, int]:
    """A stage's retry budget per class as stored; a stage stored before budgets existed gets the defaults
    with ``max_retries`` as its ``error`` budget."""
    return {**DEFAULT_RETRIES, "error": max_retries, **(retries or {})}


def stage_extras(kind: str, params: dict[str, Any]) -> frozenset[str]:
    """Optional node features a stage needs (e.g. the chgnet scorer); plugin kinds declare none here."""
    if kind not in stage_kinds():
        return frozenset()
    k = get_stage_kind(kind)
    return frozenset(k.extras(k.params.model_validate(params))) if k.extras else frozenset()


class Controller:
    def __init__(
        self,
        engine: Engine,
        heartbeat_interval: float = 5.0,
        persist_interval: float = 10.0,
        lost_timeout: float | None = None,
        home_wait: float = 600.0,
    ) -> None:
        self.engine = engine
        self.writer = Writer(engine)
        self.readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="db-read")
        self.heartbeat_interval = heartbeat_interval
        self.persist_interval = persist_interval
        self.lost_timeout = lost_timeout if lost_timeout is not None else LOST_HEARTBEATS * heartbeat_interval
        self.home_wait = home_wait
        self.started = time.time()  # nodes restored from the database get the lost timeout from here
        self.nodes: dict[str, NodeRt] = {}
        self.experiments: dict[str, ExperimentRt] = {}  # unfinished, by key
        self.attempts: dict[int, AttemptRt] = {}  # every attempt of an unfinished experiment
        self.ready: set[StageRt] = set()
        self._ids: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._events_tick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._rotation = 0
        self._waiting: WaitingReasons | None = None  # kept while no node comes, goes or changes

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        snap = await self.read(store.load_snapshot, self.engine)
        self._ids = dict(snap.max_ids)
        for n in snap.nodes:
            node = self.nodes[n["id"]] = self._node_from_facts(n["id"], n["facts"])
            node.drained, node.drain_deadline = bool(n.get("drained")), n.get("drain_deadline")
        repairs = Changes()
        self._restore(snap, repairs, time.time())
        if repairs:
            await self.commit(repairs)
        self.started = time.time()
        self._tasks = [
            asyncio.create_task(self._schedule_loop()),
            asyncio.create_task(self._persist_loop()),
            asyncio.create_task(self._monitor_loop()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._flush_heartbeats()
        self.writer.close()
        self.readers.shutdown(wait=False)

    def _restore(self, snap: store.Snapshot, ch: Changes, now: float) -> None:
        """Rebuild experiments and their live attempts from the database (after a master restart, or to
        bring back one whose handler failed, or a finished one to run again). A stage left ``pending``
        whose dependency ended failed or cancelled (a master of an older release stopped half-way
        through a cascade) is cancelled now, and one whose dependencies all succeeded is made ready,
        into ``ch``."""
        by_id: dict[int, ExperimentRt] = {}
        for e in snap.experiments:
            exp = ExperimentRt(
                e["id"],
                e["key"],
                e["name"],
                e["priority"],
                e["smoke"],
                e["shared_workdir"],
                e["state"],
                e["cancel_requested"],
                e["home_node_id"],
                e["owner"],
                plan_json=json.dumps(e["plan"]),
            )
            by_id[exp.id] = exp
            self.experiments[exp.key] = exp
        stages: dict[int, StageRt] = {}
        for s in snap.stages:
            exp = by_id[s["experiment_id"]]
            st = StageRt(
                s["id"],
                exp,
                s["position"],
                s["name"],
                s["kind"],
                s["params"],
                Resources(s["gpus"], s["cpus"], s["memory_mib"]),
                s["max_retries"],
                s["state"],
                s["attempts"],
                stage_extras(s["kind"], s["params"]),
                s["reason"],
            )
            st.retries = _budgets(s.get("retries"), s["max_retries"])
            st.budget_from = s.get("budget_from") or 1
            st.used = dict(snap.used.get(st.id, {}))
            exp.stages.append(st)
            stages[st.id] = st
            if st.state == READY:
                self.ready.add(st)
        for sid, dep in snap.deps:
            stages[sid].deps.append(stages[dep])
            stages[dep].dependents.append(stages[sid])
        for a in snap.attempts:
            st = stages[a["stage_id"]]
            att = AttemptRt(
                a["id"],
                st,
                a["number"],
                a["node_id"],
                a["lease_token"],
                tuple(a["gpu_indices"]),
                a["state"],
                a["started_at"] or 0.0,
                a.get("failure_class") or "",
            )
            st.current = att
            st.attempt_ids.append(att.id)
            self.attempts[att.id] = att
            if att.state in ACTIVE and att.node_id in self.nodes:
                self.nodes[att.node_id].allocate(att)
        for exp in by_id.values():
            before = len(ch.transitions)
            for st in exp.stages:
                if st.state != PENDING:
                    continue
                ended = next((d for d in st.deps if d.state in (FAILED, CANCELLED)), None)
                if ended is not None:
                    self._move(st, CANCELLED, f"dependency {ended.name!r} {ended.state} (repaired at start)", ch, now)
                    self._cascade_cancel(st, ended.state, ch, now)
                elif st.deps and all(d.state == SUCCEEDED for d in st.deps):
                    self._move(st, READY, "dependencies succeeded (repaired at start)", ch, now)
            ended = exp.state not in TERMINAL and all(st.state in TERMINAL for st in exp.stages)
            if len(ch.transitions) != before or ended:  # an unfinished experiment whose stages all ended
                self._update_experiment(exp, ch, now)

    # --- helpers -------------------------------------------------------------------------------

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.readers, fn, *args)

    async def commit(self, unit: Callable[[Session], T] | Changes) -> T:
        return await asyncio.wrap_future(self.writer.submit(unit))

    def _next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]

    def wake(self) -> None:
        self._wake.set()

    def known_kinds(self) -> set[str]:
        return set(stage_kinds()).union(*(n.kinds for n in self.nodes.values()))

    def _move(
        self, st: StageRt, to: str, reason: str, ch: Changes, now: float, attempt: AttemptRt | None = None
    ) -> None:
        ch.transitions.append(
            {
                "stage_id": st.id,
                "attempt_id": attempt.id if attempt else None,
                "from_state": st.state,
                "to_state": to,
                "time": now,
                "reason": reason,
            }
        )
        ch.stages.append({"id": st.id, "state": to, "reason": reason, "updated_at": now, "attempts": st.attempts})
        ch.touched.add(st.exp)
        if st.state == READY:
            self.ready.discard(st)
        st.state, st.reason = to, reason
        if to == READY:
            self.ready.add(st)

    def _cascade_cancel(self, st: StageRt, why: str, ch: Changes, now: float) -> None:
        """Cancel every stage waiting on ``st``, transitively: iterative, so a chain as long as the plan
        limit allows (1,000 stages) cannot exhaust the stack."""
        todo = [st]
        while todo:
            s = todo.pop()
            for d in s.dependents:
                if d.state in (PENDING, READY):
                    self._move(d, CANCELLED, f"dependency {s.name!r} {why}", ch, now)
                    todo.append(d)

    async def _apply(self, exp: ExperimentRt | None, build: Callable[[Changes, float], T]) -> T:
        """Run ``build`` (which changes memory and fills a :class:`Changes`) and commit what it wrote, as one
        unit. If ``build`` raises half-way or the commit fails, memory may say what the database does
        not: the experiment is then read back in the writer thread (so after every unit queued before
        this one) and rebuilt from it, and the error goes on to the caller. Nothing is awaited between
        ``build`` and queueing the commit, so no other handler sees the half-made change."""
        ch = Changes()
        try:
            result = build(ch, time.time())
            if ch:
                await self.commit(ch)
            return result
        except asyncio.CancelledError:
            raise  # the caller went away: the queued unit is still committed, and memory already says it
        except Exception:
            log.exception("a change failed; reading what it touched back from the database")
            await self._resync(ch, exp)
            raise

    async def _resync(self, ch: Changes, exp: ExperimentRt | None = None) -> None:
        """Rebuild from the database every experiment a failed change touched (see :meth:`_apply`)."""
        keys = {e.key for e in ch.touched} | ({exp.key} if exp is not None else set())
        for key in sorted(keys):
            try:
                await self._reload(key, wake=False)
            except Exception:
                log.exception("could not read experiment %s back from the database", key)
        # the next scheduling pass a little later: a database that refuses commits is not hammered
        asyncio.get_running_loop().call_later(1.0, self.wake)

    async def _reload(self, key: str, wake: bool = True) -> ExperimentRt | None:
        """Replace an experiment in memory (finished or not) with what the database holds."""
        old = self.experiments.get(key)
        if old is not None:
            self._drop(old)
        snap = await self.commit(lambda s: store.load_experiment(s, key))
        current = self.experiments.get(key)
        if current is not None:  # another reload, or a rerun, brought it back meanwhile
            self._drop(current)
        if not snap.experiments:
            return None
        repairs = Changes()
        self._restore(snap, repairs, time.time())
        if repairs:
            await self.commit(repairs)
        exp = self.experiments.get(key)
        if exp is not None and all(st.state in TERMINAL for st in exp.stages):
            self._forget(exp)  # finished: memory holds unfinished experiments only
            return None
        if wake:
            self.wake()
        return exp

    def _drop(self, exp: ExperimentRt) -> None:
        """Forget an experiment and free what its attempts hold on the nodes."""
        for st in exp.stages:
            for att_id in st.attempt_ids:
                att = self.attempts.get(att_id)
                node = self.nodes.get(att.node_id) if att is not None else None
                if node is not None and att is not None:
                    node.release(att)
        self._forget(exp)

    def _update_experiment(self, exp: ExperimentRt, ch: Changes, now: float) -> None:
        states = {s.state for s in exp.stages}
        row: dict[str, Any] = {"id": exp.id}
        if states <= TERMINAL:
            new = FAILED if FAILED in states else CANCELLED if CANCELLED in states else SUCCEEDED
            row["finished_at"] = now
            self._forget(exp)
        elif states & {ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED}:
            new = RUNNING
        else:
            new = PENDING
        if new not in TERMINAL:
            row["finished_at"] = None  # running again (rerun)
        if new != exp.state:
            exp.state = new
            ch.experiments.append({**row, "state": new})

    def _forget(self, exp: ExperimentRt) -> None:
        self.experiments.pop(exp.key, None)
        if self._waiting is not None:
            self._waiting.forget(exp)
        for st in exp.stages:
            self.ready.discard(st)
            for att_id in st.attempt_ids:
                self.attempts.pop(att_id, None)

    # --- nodes ---------------------------------------------------------------------------------

    def _node_from_facts(self, node_id: str, facts: dict[str, Any]) -> NodeRt:
        return NodeRt(
            id=node_id,
            name=facts.get("name") or facts.get("hostname") or node_id,
            facts=facts,
            cpus=float(facts.get("cpu_count", 0)),
            memory_mib=int(facts.get("memory_mib", 0)),
            gpus=[int(g.get("index", 0)) for g in facts.get("gpus", [])],
            kinds=frozenset(facts.get("stage_kinds", [])),
            extras=frozenset(facts.get("extras", [])),
        )

    async def register(self, req: infra_pb2.RegisterRequest) -> infra_pb2.RegisterResponse:
        if req.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"protocol version mismatch: the node speaks infra.v1 protocol {req.protocol_version}, "
                f"this master speaks {PROTOCOL_VERSION}; run the same infra release on both"
            )
        if not req.node_id:
            raise ValueError("node_id is required (the agent keeps it in its workdir)")
        facts = MessageToDict(req.facts, preserving_proto_field_name=True)
        now = time.time()
        node = self._node_from_facts(req.node_id, facts)
        row = {
            "id": node.id,
            "name": node.name,
            "hostname": facts.get("hostname", ""),
            "protocol_version": req.protocol_version,
            "cpus": node.cpus,
            "memory_mib": node.memory_mib,
            "facts": facts,
            "registered_at": now,
            "last_seen_at": now,
            "usage": None,
        }
        gpus = [
            {
                "index": g.get("index", 0),
                "uuid": g.get("uuid", ""),
                "name": g.get("name", ""),
                "memory_mib": int(g.get("memory_mib", 0)),
                "driver_version": g.get("driver_version", ""),
            }
            for g in facts.get("gpus", [])
        ]
        await self.commit(lambda s: store.upsert_node(s, row, gpus))
        # The session is given, and the lost clock starts, only once the row is committed: under a burst of
        # registrations the commit takes seconds, and a node cannot heartbeat before it has its session.
        old = self.nodes.get(node.id)
        if old is not None:  # keep allocations, the open stream and an operator's drain
            node.attempts, node.queue = old.attempts, old.queue
            node.drained, node.drain_deadline = old.drained, old.drain_deadline
            for att in old.attempts.values():
                node.allocate(att)
            if old.lost:
                log.info("lost node %s (%s) is back", node.name, node.id)
        node.session = secrets.randbits(62) or 1
        node.last_heartbeat = time.time()
        self.nodes[node.id] = node
        for r in req.running:  # what it holds that the master no longer wants: cancelled when its stream opens
            if self._current(node.id, r.attempt_id, r.lease_token) is None:
                node.pending_cancels.append((r.attempt_id, r.lease_token))
        log.info(
            "node %s (%s) registered: %s cpus, %s MiB, gpus %s",
            node.name,
            node.id,
            node.cpus,
            node.memory_mib,
            node.gpus,
        )
        self.wake()
        return infra_pb2.RegisterResponse(
            protocol_version=PROTOCOL_VERSION,
            node_id=node.id,
            session=node.session,
            heartbeat_interval_s=self.heartbeat_interval,
            lost_timeout_s=self.lost_timeout,
        )

    def heartbeat(self, req: infra_pb2.HeartbeatRequest) -> infra_pb2.HeartbeatResponse:
        """Memory only: the last usage is persisted periodically by :meth:`_persist_loop`. Attempts the node
        still runs whose lease is gone (the node was lost meanwhile) come back as ``revoked``."""
        node = self.nodes.get(req.node_id)
        if node is None or node.session != req.session or node.lost:
            return infra_pb2.HeartbeatResponse(reregister=True)
        now = time.time()
        node.last_heartbeat = now
        node.usage = req.usage
        node.heartbeat_dirty = True
        if node.beat_at is not None:
            self._fail_missing(node, {r.attempt_id for r in req.running}, now)
        node.beat_at = now
        if node.unavailable != req.unavailable:
            node.unavailable = req.unavailable
            if req.unavailable:
                log.warning("node %s takes no new stages: %s", node.name, req.unavailable)
            else:
                self.wake()
        revoked = [r.attempt_id for r in req.running if self._current(node.id, r.attempt_id, r.lease_token) is None]
        return infra_pb2.HeartbeatResponse(revoked=revoked)

    def _fail_missing(self, node: NodeRt, listed: set[int], now: float) -> None:
        """Fail the attempts running here that the node no longer holds (its agent restarted without them).
        Only those started before the previous heartbeat count: the agent holds an attempt before reporting
        it RUNNING and builds a heartbeat only after the previous one was answered, so such an attempt
        missing from this heartbeat is really gone, never a report still on its way."""
        gone = [
            att
            for att in node.attempts.values()
            if att.state == RUNNING and att.id not in listed and att.started_at < (node.beat_at or 0)
        ]
        if not gone:
            return
        ch = Changes()
        for att in gone:
            self._finish(
                att,
                FAILED,
                -1,
                "the node no longer runs this attempt (its agent restarted without it)",
                ch,
                now,
                NODE_LOST,
            )
        asyncio.ensure_future(self._commit_logged(ch, f"failing {len(gone)} attempt(s) gone from {node.name}"))

    async def _commit_logged(self, ch: Changes, what: str) -> None:
        try:
            await self.commit(ch)
        except Exception:
            log.exception("could not record %s; reading it back from the database", what)
            await self._resync(ch)

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(self.persist_interval)
            try:
                await self._flush_heartbeats()
            except Exception as e:  # the next round retries; a lost usage sample is harmless
                log.warning("could not persist heartbeats: %s", e)

    async def _flush_heartbeats(self) -> None:
        """Collects the changed nodes on the loop (cheap) and converts their usage in the writer thread:
        turning 1,000 messages into dicts on the loop would stall every call for tens of milliseconds."""
        changed = []
        for n in self.nodes.values():
            if n.heartbeat_dirty and n.last_heartbeat is not None:
                n.heartbeat_dirty = False
                changed.append((n.id, n.last_heartbeat, n.usage))
        if not changed:
            return

        def save(s: Session) -> None:
            rows = [
                {
                    "id": node_id,
                    "last_seen_at": seen,
                    "usage": MessageToDict(usage, preserving_proto_field_name=True) if usage is not None else None,
                }
                for node_id, seen, usage in changed
            ]
            store.save_heartbeats(s, rows)

        await self.commit(save)

    def online(self, node: NodeRt) -> bool:
        hb = node.last_heartbeat
        return node.queue is not None and not node.lost and hb is not None and time.time() - hb < self.lost_timeout

    def node_state(self, node: NodeRt) -> str:
        return "lost" if node.lost else "online" if self.online(node) else "offline"

    # --- lost nodes ----------------------------------------------------------------------------

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.lost_timeout / 4))
            try:
                await self.check_nodes()
            except Exception:
                log.exception("lost-node check failed")

    async def check_nodes(self) -> None:
        """Declare nodes whose heartbeats stopped lost (their attempts fail, retry policy applies) and give
        experiments whose home node stayed lost past ``home_wait`` a new home."""
        now = time.time()
        ch = Changes()
        try:
            stops = self._check_nodes(ch, now)
            if ch:
                await self.commit(ch)
        except Exception:
            await self._resync(ch)
            raise
        for node, command in stops:  # after the commit: the attempt is already ended at the master
            if node.queue is not None:
                node.queue.put_nowait(command)

    def _check_nodes(self, ch: Changes, now: float) -> list[tuple[NodeRt, infra_pb2.NodeCommand]]:
        for node in self.nodes.values():
            if node.lost and not node.attempts:  # attempts on a lost node: read back after a failed commit
                continue
            # a node not heard from since this master started gets twice the timeout: after a master
            # restart every node must notice, reconnect (with backoff) and register again
            silent = now - (node.last_heartbeat or self.started)
            if silent > (self.lost_timeout if node.last_heartbeat else 2 * self.lost_timeout):
                self._lose(node, silent, ch, now)
        stops: list[tuple[NodeRt, infra_pb2.NodeCommand]] = []
        for node in self.nodes.values():
            if node.drained and node.drain_deadline is not None and now >= node.drain_deadline and node.attempts:
                stops += self._preempt(node, ch, now)
        for exp in list(self.experiments.values()):
            home = self.nodes.get(exp.home_node) if exp.home_node else None
            if exp.shared_workdir or home is None or not home.lost or now - (home.lost_at or now) < self.home_wait:
                continue
            self._rehome(exp, home, ch, now)
        return stops

    def _preempt(self, node: NodeRt, ch: Changes, now: float) -> list[tuple[NodeRt, infra_pb2.NodeCommand]]:
        """A drained node's deadline has passed: what still runs there ends as ``preempted`` (retried
        elsewhere within that budget) and the node is told to stop its copy, whose lease is then gone."""
        why = f"node {node.name} drained: its deadline passed before the attempt ended"
        log.warning("node %s: drain deadline passed; preempting %d attempt(s)", node.name, len(node.attempts))
        stops = []
        for att in list(node.attempts.values()):
            stops.append((node, self._cancel_command(att.id, att.lease, why)))
            self._finish(att, FAILED, -1, why, ch, now, PREEMPTED)
        return stops

    # --- operator controls ---------------------------------------------------------------------

    @staticmethod
    def _rerun_targets(exp: ExperimentRt, stage: str) -> set[StageRt]:
        """The stages a rerun runs again: ``stage`` or every failed and cancelled stage, and everything
        after them (iterative, like the cascade); refused while one of them still runs."""
        if stage:
            start = next((st for st in exp.stages if st.name == stage), None)
            if start is None:
                raise NotFound(f"no stage {exp.key}/{stage}")
            roots = [start]
        else:
            roots = [st for st in exp.stages if st.state in (FAILED, CANCELLED)]
        targets: set[StageRt] = set()
        todo = list(roots)
        while todo:
            st = todo.pop()
            if st not in targets:
                targets.add(st)
                todo.extend(st.dependents)
        busy = sorted(st.name for st in targets if st.state in ACTIVE)
        if busy:
            raise Refused(f"stage(s) {', '.join(busy)} of {exp.key} still run: cancel them or wait")
        if not targets:
            raise Refused(f"nothing to rerun: every stage of {exp.key} succeeded or still runs")
        return targets

    def find_node(self, ref: str) -> NodeRt:
        node = self.nodes.get(ref) or next((n for n in self.nodes.values() if n.name == ref), None)
        if node is None:
            raise NotFound(f"no node {ref!r} (infra node list shows them)")
        return node

    async def drain(self, ref: str, undrain: bool = False, deadline_s: float = 0.0) -> NodeRt:
        """Drain a node (no new stages; running ones finish, or after ``deadline_s`` are preempted) or take
        it back. Persisted before memory changes, so a master restart keeps it."""
        node = self.find_node(ref)
        drained = not undrain
        deadline = time.time() + deadline_s if drained and deadline_s > 0 else None
        await self.commit(lambda s: store.set_drain(s, node.id, drained, deadline))
        node.drained, node.drain_deadline = drained, deadline
        log.info("node %s %s", node.name, "drained" if drained else "undrained")
        self.wake()
        return node

    async def rerun(self, key: str, stage: str = "", who: str = "") -> list[str]:
        """New attempts for an experiment's stages (the old attempts are kept): with ``stage``, that stage
        and every stage after it; without, every stage that did not succeed and every stage after those.
        A finished experiment is read back into memory. Budgets start afresh for the stages that run
        again (attempts from the next number on count)."""
        exp = self.experiments.get(key)
        if exp is None:
            snap = await self.commit(lambda s: store.load_experiment(s, key))
            if not snap.experiments:
                raise NotFound(f"no experiment {key!r}")
            exp = self.experiments.get(key)  # a handler may have loaded it meanwhile
            if exp is None:
                self._restore(snap, Changes(), time.time())
                exp = self.experiments[key]
        try:
            targets = self._rerun_targets(exp, stage)
        except (NotFound, Refused):
            if all(st.state in TERMINAL for st in exp.stages):
                self._forget(exp)  # memory holds unfinished experiments only
            raise
        why = f"rerun requested by {who}" if who else "rerun requested"

        def build(ch: Changes, now: float) -> list[str]:
            if exp.cancel_requested:
                exp.cancel_requested = False
                ch.experiments.append({"id": exp.id, "cancel_requested": False})
            ordered = sorted(targets, key=lambda st: st.position)
            for st in ordered:
                st.budget_from, st.used = st.attempts + 1, {}
                ch.stages.append({"id": st.id, "budget_from": st.budget_from})
            for st in ordered:
                ready = all(d.state == SUCCEEDED and d not in targets for d in st.deps)
                self._move(st, READY if ready else PENDING, why, ch, now)
            self.experiments[exp.key] = exp
            self._update_experiment(exp, ch, now)
            return [st.name for st in ordered]

        names = await self._apply(exp, build)
        log.info("experiment %s: rerun of %s", key, ", ".join(names))
        self.wake()
        return names

    def _lose(self, node: NodeRt, silent: float, ch: Changes, now: float) -> None:
        if node.session or node.attempts:  # not the nodes of earlier days that never came back
            log.warning("node %s (%s) lost: no heartbeat for %.1fs", node.name, node.id, silent)
        node.lost_at = node.lost_at or now  # already lost: attempts read back after a failed commit
        node.session = 0  # its next call must re-register, which reconciles what it still runs
        if node.queue is not None:
            node.queue.put_nowait(None)  # ends its command stream
        why = f"node {node.name} lost: no heartbeat for {silent:.1f}s"
        for att in list(node.attempts.values()):
            self._finish(att, FAILED, -1, why, ch, now, NODE_LOST)

    def _rehome(self, exp: ExperimentRt, home: NodeRt, ch: Changes, now: float) -> None:
        """The files of an experiment without a shared workdir are on its home node: when that node stays
        lost past ``home_wait``, everything it produced is run again on a new home."""
        gone = now - (home.lost_at or now)
        log.warning("experiment %s: home node %s lost for %.0fs; starting over elsewhere", exp.key, home.name, gone)
        exp.home_node = None
        ch.experiments.append({"id": exp.id, "home_node_id": None})
        why = f"home node {home.name} lost for {gone:.0f}s: its outputs are gone with it; running again elsewhere"
        for st in exp.stages:  # every product is gone: stages with dependencies wait for them again
            target = PENDING if st.deps else READY
            if st.state in (SUCCEEDED, READY) and st.state != target:
                self._move(st, target, why, ch, now)
        self._update_experiment(exp, ch, now)
        self.wake()

    async def assignments(self, node_id: str, session: int) -> AsyncIterator[infra_pb2.NodeCommand]:
        """The node's command stream: re-sends what it may have missed, then new commands as they come."""
        node = self.nodes.get(node_id)
        if node is None or node.session != session:
            raise NotFound("unknown node session: register first")
        q: asyncio.Queue[infra_pb2.NodeCommand | None] = asyncio.Queue()
        node.queue = q
        for att in node.attempts.values():
            if att.state == ASSIGNED:
                q.put_nowait(self._assignment(att))
            if att.stage.exp.cancel_requested:
                q.put_nowait(self._cancel_command(att.id, att.lease, "experiment cancelled"))
        for att_id, lease in node.pending_cancels:
            q.put_nowait(self._cancel_command(att_id, lease, "this attempt is not current at the master"))
        node.pending_cancels.clear()
        self.wake()
        try:
            while (command := await q.get()) is not None:
                yield command
        finally:
            if node.queue is q:
                node.queue = None

    def _assignment(self, att: AttemptRt) -> infra_pb2.NodeCommand:
        st = att.stage
        r = st.resources
        return infra_pb2.NodeCommand(
            assign=infra_pb2.Assignment(
                attempt_id=att.id,
                lease_token=att.lease,
                attempt=att.number,
                stage_id=st.id,
                experiment=st.exp.key,
                stage=st.name,
                kind=st.kind,
                params_json=json.dumps(st.params),
                smoke=st.exp.smoke,
                resources=infra_pb2.Resources(gpus=r.gpus, cpus=r.cpus, memory_mib=r.memory_mib),
                gpu_indices=list(att.gpus),
                plan_json=st.exp.plan_json,
            )
        )

    @staticmethod
    def _cancel_command(att_id: int, lease: str, reason: str) -> infra_pb2.NodeCommand:
        return infra_pb2.NodeCommand(
            cancel=infra_pb2.CancelAttempt(attempt_id=att_id, lease_token=lease, reason=reason)
        )

    # --- submit and cancel ---------------------------------------------------------------------

    async def submit(self, plan_json: str, owner: str | None = None) -> str:
        """Validation runs in a thread: a large plan (up to the size limit) must not stall the loop."""
        kinds = self.known_kinds()
        plan = await self.read(lambda: validate_plan(parse_plan_text(plan_json), known_kinds=kinds))
        now = time.time()
        ids_before = dict(self._ids)
        exp = ExperimentRt(
            self._next_id("experiment"), "", plan.name, plan.priority, plan.smoke, plan.shared_workdir, PENDING
        )
        exp.owner = owner
        exp.key = f"{plan.name}-{exp.id}"
        exp.plan_json = json.dumps(plan.to_dict())
        by_name: dict[str, StageRt] = {}
        for pos, s in enumerate(plan.stages):
            st = StageRt(
                self._next_id("stage"),
                exp,
                pos,
                s.name,
                s.kind,
                s.params,
                s.resources,
                s.max_retries,
                PENDING,
                extras=stage_extras(s.kind, s.params),
                retries=dict(s.retries),
            )
            exp.stages.append(st)
            by_name[s.name] = st
        for s in plan.stages:
            for dep in s.after:
                by_name[s.name].deps.append(by_name[dep])
                by_name[dep].dependents.append(by_name[s.name])
        rows, transitions = self._experiment_rows(exp, plan, now)
        deps = [{"stage_id": st.id, "depends_on_id": d.id} for st in exp.stages for d in st.deps]
        ids_after = dict(self._ids)
        try:
            await self.commit(lambda s: store.create_experiment(s, rows[0], rows[1], deps, transitions))
        except Exception:
            # nothing of it is in memory yet; its ids are given back unless another submit took ids since
            if self._ids == ids_after:
                self._ids = ids_before
            raise
        self.experiments[exp.key] = exp
        self.ready.update(st for st in exp.stages if st.state == READY)
        self.wake()
        log.info("experiment %s submitted: %d stages", exp.key, len(exp.stages))
        return exp.key

    def _experiment_rows(self, exp: ExperimentRt, plan: Plan, now: float) -> tuple[Any, list[dict[str, Any]]]:
        transitions = []
        for st in exp.stages:
            st.reason = "submitted"
            transitions.append(
                {
                    "stage_id": st.id,
                    "attempt_id": None,
                    "from_state": "",
                    "to_state": PENDING,
                    "time": now,
                    "reason": "submitted",
                }
            )
            if not st.deps:
                st.state, st.reason = READY, "no dependencies"
                transitions.append(
                    {
                        "stage_id": st.id,
                        "attempt_id": None,
                        "from_state": PENDING,
                        "to_state": READY,
                        "time": now,
                        "reason": "no dependencies",
                    }
                )
        exp_row = {
            "id": exp.id,
            "key": exp.key,
            "name": exp.name,
            "priority": exp.priority,
            "smoke": exp.smoke,
            "shared_workdir": exp.shared_workdir,
            "plan": plan.to_dict(),
            "state": PENDING,
            "cancel_requested": False,
            "home_node_id": None,
            "owner": exp.owner,
            "created_at": now,
            "finished_at": None,
        }
        stage_rows = [
            {
                "id": st.id,
                "experiment_id": exp.id,
                "position": st.position,
                "name": st.name,
                "kind": st.kind,
                "params": st.params,
                "gpus": st.resources.gpus,
                "cpus": st.resources.cpus,
                "memory_mib": st.resources.memory_mib,
                "max_retries": st.max_retries,
                "retries": st.retries,
                "budget_from": 1,
                "state": st.state,
                "reason": st.reason,
                "attempts": 0,
                "updated_at": now,
            }
            for st in exp.stages
        ]
        return (exp_row, stage_rows), transitions

    async def cancel(self, key: str, reason: str) -> tuple[int, int, str]:
        """(stages cancelled at once, running attempts told to stop, "" or the state of an experiment that
        had already finished, to which nothing is done)."""
        exp = self.experiments.get(key)
        if exp is None:
            state = await self.read(store.experiment_state, self.engine, key)
            if state is None:
                raise NotFound(f"no experiment {key!r}")
            return 0, 0, state
        why = f"cancelled: {reason}" if reason else "cancelled"
        stops: list[tuple[NodeRt, infra_pb2.NodeCommand]] = []

        def build(ch: Changes, now: float) -> tuple[int, int]:
            exp.cancel_requested = True
            ch.experiments.append({"id": exp.id, "cancel_requested": True})
            cancelled = signalled = 0
            for st in exp.stages:
                if st.state in (PENDING, READY):
                    self._move(st, CANCELLED, why, ch, now)
                    cancelled += 1
                elif st.state in ACTIVE and st.current is not None:
                    node = self.nodes.get(st.current.node_id)
                    if node is not None and node.queue is not None:
                        stops.append((node, self._cancel_command(st.current.id, st.current.lease, why)))
                    signalled += 1  # a node that is away gets the cancel when its stream reopens
            self._update_experiment(exp, ch, now)
            return cancelled, signalled

        cancelled, signalled = await self._apply(exp, build)
        for node, command in stops:
            if node.queue is not None:
                node.queue.put_nowait(command)
        return cancelled, signalled, ""

    # --- scheduling ----------------------------------------------------------------------------

    async def _schedule_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.002)  # let a burst of reports coalesce into one pass
            try:
                self._schedule()
            except Exception:
                log.exception("scheduling pass failed")

    def _can_run(self, node: NodeRt, kinds: set[str], extras: set[str]) -> bool:
        return kinds <= node.kinds and extras <= node.extras

    def _place(self, st: StageRt, nodes: list[NodeRt]) -> NodeRt | None:
        """Best fit on GPUs (the fewest GPUs left idle), scanning from a rotating start so that equal
        nodes share the work; a node that fits with no GPU left idle ends the scan."""
        exp, r = st.exp, st.resources
        if not exp.shared_workdir and exp.home_node is not None:  # its inputs are on that node
            node = self.nodes.get(exp.home_node)
            ok = node is not None and node.schedulable() and node.fits(r)
            return node if ok and self._can_run(node, {st.kind}, set(st.extras)) else None
        if exp.shared_workdir:
            kinds, extras, need = {st.kind}, set(st.extras), r
        else:  # choosing the home node: it must be able to run every stage of the experiment
            kinds, extras, need = exp.kinds(), exp.extras(), exp.need()
        best, best_spare = None, None
        n = len(nodes)
        for k in range(n):
            node = nodes[(self._rotation + k) % n]
            if node.fits(r) and node.could_fit(need) and self._can_run(node, kinds, extras):
                spare = len(node.gpus) - len(node.used_gpus) - r.gpus
                if best_spare is None or spare < best_spare:
                    best, best_spare = node, spare
                    if spare == 0:
                        break
        self._rotation += 1
        return best

    @staticmethod
    def _shape(st: StageRt) -> tuple[Any, ...]:
        """What decides whether a stage fits somewhere: within one pass (free resources only shrink), once a
        shape found no node, every later stage of that shape is skipped without scanning the nodes again."""
        exp = st.exp
        if exp.shared_workdir:
            return (st.resources, st.kind, st.extras)
        if exp.home_node is None:
            return (st.resources, frozenset(exp.kinds()), frozenset(exp.extras()), exp.need())
        return (st.resources, st.kind, st.extras, exp.home_node)

    @staticmethod
    def _set_reason(st: StageRt, reason: str, ch: Changes, now: float) -> None:
        """A stage that stays ``ready`` for a new reason: its row says so, no transition; an unchanged
        reason writes nothing, so passes over a waiting backlog cost the database nothing."""
        if reason != st.reason:
            st.reason = reason
            ch.stages.append({"id": st.id, "reason": reason, "updated_at": now})

    def _waiting_reasons(self) -> WaitingReasons:
        """The last pass's explainer, as long as the same nodes are online with the same facts (a node that
        registers again is a new object) and the same ones take no new stages: what it keeps depends on
        nothing else."""
        online = [n for n in self.nodes.values() if n.queue is not None and not n.lost]
        fleet = [(n, bool(n.unavailable or n.drained)) for n in online]
        if self._waiting is None or self._waiting.fleet != fleet:
            self._waiting = WaitingReasons(self.nodes, fleet)
        return self._waiting

    def _schedule(self) -> None:
        """One pass over the ready stages (at most ``MAX_PLACEMENTS`` placements, so that a huge backlog
        never holds the event loop for long; a full pass wakes the next one)."""
        if not self.ready:
            return
        nodes = [n for n in self.nodes.values() if n.schedulable() and n.used_cpus < n.cpus]
        if not nodes and any(n.schedulable() for n in self.nodes.values()):
            return  # every node is full: the next stage to end wakes a pass, which also says who waits why
        now = time.time()
        ch = Changes()
        sent: list[tuple[NodeRt, AttemptRt]] = []
        try:
            self._place_ready(nodes, ch, sent, now)
        except Exception:  # nothing of this pass was queued: memory goes back to what the database says
            asyncio.ensure_future(self._resync(ch))
            raise
        if ch:  # queued now, so that a later change of the same stages (a cancel) is written after it
            asyncio.ensure_future(self._deliver(asyncio.wrap_future(self.writer.submit(ch)), sent, ch))

    def _place_ready(self, nodes: list[NodeRt], ch: Changes, sent: list[tuple[NodeRt, AttemptRt]], now: float) -> None:
        unplaceable: dict[tuple[Any, ...], str] = {}  # shape -> why ("": it depends on the experiment)
        waiting: WaitingReasons | None = None  # taken on the first stage that finds no node
        for st in sorted(self.ready, key=StageRt.sort_key):
            if len(sent) >= MAX_PLACEMENTS:
                self.wake()
                break
            shape = self._shape(st)
            why = unplaceable.get(shape)
            node = None if why is not None else self._place(st, nodes)
            if node is None:
                waiting = waiting or self._waiting_reasons()
                if why is None:
                    why = unplaceable[shape] = waiting.explain(st, shape)
                self._set_reason(st, why or waiting.impossible(st.exp), ch, now)
                continue
            st.attempts += 1
            att = AttemptRt(
                self._next_id("attempt"),
                st,
                st.attempts,
                node.id,
                secrets.token_hex(16),
                tuple(node.free_gpus()[: st.resources.gpus]),
                ASSIGNED,
            )
            node.allocate(att)
            st.current = att
            st.attempt_ids.append(att.id)
            self.attempts[att.id] = att
            ch.new_attempts.append(
                {
                    "id": att.id,
                    "stage_id": st.id,
                    "number": att.number,
                    "node_id": node.id,
                    "lease_token": att.lease,
                    "gpu_indices": list(att.gpus),
                    "state": ASSIGNED,
                    "exit_code": None,
                    "message": "",
                    "failure_class": "",
                    "assigned_at": now,
                    "started_at": None,
                    "finished_at": None,
                }
            )
            self._move(st, ASSIGNED, f"attempt {att.number} assigned to {node.name}", ch, now, att)
            if not st.exp.shared_workdir and st.exp.home_node is None:
                st.exp.home_node = node.id
                ch.experiments.append({"id": st.exp.id, "home_node_id": node.id})
            self._update_experiment(st.exp, ch, now)
            sent.append((node, att))

    async def _deliver(self, committed: Awaitable[None], sent: list[tuple[NodeRt, AttemptRt]], ch: Changes) -> None:
        """Send assignments once they are committed; one that cannot be sent now is re-sent when the
        node's stream reopens (it stays 'assigned'). A pass that could not be recorded is undone in memory
        by reading its experiments back: those stages are ready again and the nodes' resources free."""
        try:
            await committed
        except Exception:
            log.exception("could not record a scheduling pass (%d assignments)", len(sent))
            await self._resync(ch)
            return
        for node, att in sent:
            if node.queue is not None and att.state == ASSIGNED:
                node.queue.put_nowait(self._assignment(att))

    # --- reports from nodes --------------------------------------------------------------------

    def _current(self, node_id: str, attempt_id: int, lease: str) -> AttemptRt | None:
        att = self.attempts.get(attempt_id)
        if att is None or att.lease != lease or att.node_id != node_id or att.stage.current is not att:
            return None
        return att

    def _heard_from(self, node_id: str) -> None:
        """Any report is a sign of life: a master slow to get to a node's heartbeat must not lose it."""
        node = self.nodes.get(node_id)
        if node is not None and node.session and not node.lost:
            node.last_heartbeat = time.time()

    async def report_status(self, rep: infra_pb2.StageStatusReport) -> tuple[bool, str]:
        self._heard_from(rep.node_id)
        att = self._current(rep.node_id, rep.attempt_id, rep.lease_token)
        state = STATE_NAMES.get(rep.state, "")
        if att is None:
            # a repeated final report whose first acknowledgement was lost, for an experiment that has
            # since finished (and left memory): the database says whether it is already recorded
            row = await self.read(store.attempt_brief, self.engine, rep.attempt_id)
            if row == (rep.lease_token, rep.node_id, state):
                return True, "already recorded"
            return False, "stale lease: this attempt is not current at the master"
        if state == att.state:
            return True, "already recorded"
        if att.state in TERMINAL:
            return False, f"attempt already {att.state}"
        if state not in (RUNNING, SUCCEEDED, FAILED, CANCELLED) or (state == RUNNING and att.state != ASSIGNED):
            return False, f"invalid report {state or rep.state!r} for an attempt that is {att.state}"
        cls = ""
        if state == CANCELLED:
            cls = CANCELLED_CLASS
        elif state == FAILED:
            cls = FAILURE_CLASSES.get(rep.failure_class, ERROR)

        def build(ch: Changes, now: float) -> None:
            if state == RUNNING:
                att.state, att.started_at = RUNNING, now
                ch.attempts.append({"id": att.id, "state": RUNNING, "started_at": now})
                node = self.nodes.get(att.node_id)
                where = node.name if node else att.node_id
                self._move(att.stage, RUNNING, f"attempt {att.number} started on {where}", ch, now, att)
                self._update_experiment(att.stage.exp, ch, now)
            else:
                self._finish(att, state, rep.exit_code, rep.message, ch, now, cls)

        await self._apply(att.stage.exp, build)
        return True, ""

    def _finish(
        self, att: AttemptRt, state: str, exit_code: int, message: str, ch: Changes, now: float, cls: str = ""
    ) -> None:
        """End an attempt. A failed one is retried while its class's budget lasts (``cancelled`` never is,
        nor anything of an experiment being cancelled); otherwise the stage ends and what waits on it is
        cancelled."""
        st, exp = att.stage, att.stage.exp
        if state != SUCCEEDED and not cls:
            cls = CANCELLED_CLASS if state == CANCELLED else ERROR
        if state == SUCCEEDED:
            cls = ""
        att.state, att.failure_class = state, cls
        ch.attempts.append(
            {
                "id": att.id,
                "state": state,
                "exit_code": exit_code,
                "message": message[:4000],
                "finished_at": now,
                "failure_class": cls,
            }
        )
        node = self.nodes.get(att.node_id)
        if node is not None:
            node.release(att)
        detail = f"attempt {att.number} {state} (exit {exit_code}" + (f", {cls})" if cls else ")")
        detail += f": {message}" if message else ""
        if state == FAILED and cls != CANCELLED_CLASS and not exp.cancel_requested and att.number >= st.budget_from:
            st.used[cls] = st.used.get(cls, 0) + 1
        if state == SUCCEEDED:
            self._move(st, SUCCEEDED, detail, ch, now, att)
            for d in st.dependents:
                if d.state == PENDING and all(x.state == SUCCEEDED for x in d.deps):
                    self._move(d, READY, "dependencies succeeded", ch, now)
        elif state == FAILED and not exp.cancel_requested and cls != CANCELLED_CLASS and self._budget_left(st, cls):
            budget = st.retries.get(cls, 0)
            self._move(st, READY, f"{detail}; retry {st.used[cls]} of {budget} ({cls})", ch, now, att)
        else:
            final = CANCELLED if state == CANCELLED or exp.cancel_requested else FAILED
            self._move(st, final, detail, ch, now, att)
            self._cascade_cancel(st, final, ch, now)
        self._update_experiment(exp, ch, now)
        self.wake()

    @staticmethod
    def _budget_left(st: StageRt, cls: str) -> bool:
        """The retries spent in ``cls`` (this failure included) are within the stage's budget for it."""
        return st.used.get(cls, 0) <= st.retries.get(cls, 0)

    async def report_events(self, batch: infra_pb2.EventBatch) -> tuple[int, list[int]]:
        """Fencing on the loop (a dict lookup per event); turning events into rows in the writer thread."""
        self._heard_from(batch.node_id)
        accepted, rejected = [], set()
        for ev in batch.events:
            if self._current(batch.node_id, ev.attempt_id, ev.lease_token) is None:
                rejected.add(ev.attempt_id)
            else:
                accepted.append(ev)
        node_id = batch.node_id
        stored = await self.commit(lambda s: store.insert_events(s, event_rows(node_id, accepted))) if accepted else 0
        if accepted:
            tick, self._events_tick = self._events_tick, asyncio.Event()
            tick.set()
        return stored, sorted(rejected)

    async def wait_for_events(self, timeout: float) -> None:
        """Return when new events were stored (or after ``timeout``): how ``logs --follow`` waits."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._events_tick.wait(), timeout)


class WaitingReasons:
    """Why ready stages found no node, for their ``reason`` (``infra status``); asked only for a stage that
    was not placed, once per shape and pass. What depends only on the online nodes (all but a home node's
    free resources) is kept across passes while they stay the same: the verdict for a shape, what each
    kind, extras and resources lack, and the reason of each experiment that no node could ever take."""

    def __init__(self, nodes: dict[str, NodeRt], fleet: list[tuple[NodeRt, bool]]) -> None:
        self.nodes = nodes
        self.fleet = fleet  # (online node, takes no new stages)
        self.online = [n for n, _ in fleet]
        self._shapes: dict[tuple[Any, ...], str] = {}
        self._problems: dict[tuple[str, frozenset[str], Resources], str | None] = {}
        self._experiments: dict[int, str] = {}

    def explain(self, st: StageRt, shape: tuple[Any, ...]) -> str:
        """Why no node takes a stage of this shape now; "" when no node could ever take its experiment, whose
        stages then say why (:meth:`impossible`)."""
        if not st.exp.shared_workdir and st.exp.home_node is not None:
            return self._home(st, st.exp.home_node)  # the node's free resources change every pass
        if shape not in self._shapes:
            self._shapes[shape] = self._explain(st)
        return self._shapes[shape]

    def forget(self, exp: ExperimentRt) -> None:
        self._experiments.pop(exp.id, None)

    def _explain(self, st: StageRt) -> str:
        exp, r = st.exp, st.resources
        if not self.online:
            return "waiting: no online node"
        if exp.shared_workdir:
            problem = self._problem(st)
            if problem:
                return f"waiting: no online node can run this stage ({problem})"
            able = [n for n in self.online if _can_ever_run(n, {st.kind}, st.extras, r)]
        else:
            able = [n for n in self.online if _can_ever_run(n, exp.kinds(), exp.extras(), exp.need())]
            if not able:
                return ""
        if all(n.unavailable or n.drained for n in able):
            names = ", ".join(sorted(n.name for n in able)[:3]) + (", ..." if len(able) > 3 else "")
            return f"waiting: the nodes that can run it take no new stages now ({names}; see infra status)"
        return f"waiting for resources: needs {_amounts(r)}"

    def _home(self, st: StageRt, home: str) -> str:
        """A stage of an experiment without a shared workdir can only run where its inputs are."""
        node = self.nodes.get(home)
        where = f"waiting for node {node.name if node else home}"
        if node is None or node.lost:
            return f"{where}: it is lost (after --home-wait the experiment starts over on another node)"
        if node.queue is None:
            return f"{where}: it is offline"
        problem = _cannot_run([node], st.kind, st.extras, st.resources)
        if problem:
            return f"{where}: it cannot run this stage ({problem})"
        if node.drained:
            return f"{where}: it is drained by an operator (infra node undrain {node.name})"
        if node.unavailable:
            return f"{where}: it takes no new stages now (see infra status)"
        free = Resources(
            len(node.gpus) - len(node.used_gpus), node.cpus - node.used_cpus, node.memory_mib - node.used_memory_mib
        )
        return f"{where}: busy ({_shortfall(st.resources, free, lambda v: f'{v} free')})"

    def _problem(self, st: StageRt) -> str | None:
        key = (st.kind, st.extras, st.resources)
        if key not in self._problems:
            self._problems[key] = _cannot_run(self.online, st.kind, st.extras, st.resources)
        return self._problems[key]

    def impossible(self, exp: ExperimentRt) -> str:
        """No online node can run every stage of the experiment: what each stage lacks, by stage name."""
        if exp.id not in self._experiments:
            stages: dict[str, list[str]] = {}
            for s in exp.stages:
                if problem := self._problem(s):
                    stages.setdefault(problem, []).append(s.name)
            detail = "; ".join(
                f"stage{'s' if len(names) > 1 else ''} {', '.join(names)}: {problem}"
                for problem, names in stages.items()
            )
            self._experiments[exp.id] = (
                "waiting: no online node can run every stage of this experiment "
                f"({detail or 'each stage fits some node, but no node fits all of them'})"
            )
        return self._experiments[exp.id]


def _can_ever_run(node: NodeRt, kinds: set[str], extras: set[str] | frozenset[str], need: Resources) -> bool:
    return kinds <= node.kinds and extras <= node.extras and node.could_fit(need)


def _cannot_run(nodes: list[NodeRt], kind: str, extras: frozenset[str], r: Resources) -> str | None:
    """What keeps every one of ``nodes`` from ever running a stage (None: one of them could, once free)."""
    able = [n for n in nodes if kind in n.kinds]
    if not able:
        return f"kind {kind!r} not offered"
    missing = extras - frozenset().union(*(n.extras for n in able))
    if missing:
        return f"missing extra{'s' if len(missing) > 1 else ''} " + ", ".join(repr(e) for e in sorted(missing))
    fit = [n for n in able if extras <= n.extras]
    if not fit:
        return "no node has extras " + ", ".join(repr(e) for e in sorted(extras)) + " together"
    if any(n.could_fit(r) for n in fit):
        return None
    most = Resources(max(len(n.gpus) for n in fit), max(n.cpus for n in fit), max(n.memory_mib for n in fit))
    if len(nodes) == 1:
        largest = f"node {nodes[0].name}"
    else:
        largest = "the largest node" if len(fit) == len(nodes) else "the largest node able to run it"
    return _shortfall(r, most, lambda v: f"{largest} has {v}") or f"needs {_amounts(r)} on one node, none has all"


def _shortfall(r: Resources, have: Resources, against: Callable[[str], str]) -> str:
    """Each resource that ``r`` asks beyond ``have``, e.g. ``needs 4 cpus, the largest node has 2`` where
    ``against("2")`` says the second half; empty when ``r`` fits."""
    parts = []
    if r.gpus > have.gpus:
        parts.append(f"needs {_count(r.gpus, 'gpu')}, {against(str(have.gpus))}")
    if r.cpus > have.cpus + 1e-9:
        parts.append(f"needs {_count(r.cpus, 'cpu')}, {against(f'{have.cpus:g}')}")
    if r.memory_mib > have.memory_mib:
        parts.append(f"needs {r.memory_mib} MiB memory, {against(f'{have.memory_mib} MiB')}")
    return "; ".join(parts)


def _amounts(r: Resources) -> str:
    """``1 gpu, 4 cpus, 2048 MiB memory`` (zeros left out)."""
    parts = []
    if r.gpus:
        parts.append(_count(r.gpus, "gpu"))
    if r.cpus:
        parts.append(_count(r.cpus, "cpu"))
    if r.memory_mib:
        parts.append(f"{r.memory_mib} MiB memory")
    return ", ".join(parts)


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}{'' if n == 1 else 's'}"


def event_rows(node_id: str, events: list[infra_pb2.Event]) -> list[dict[str, Any]]:
    rows = []
    for ev in events:
        if ev.WhichOneof("body") == "artifact" and not _inside(ev.artifact.path):
            log.warning("node %s sent artifact path %r outside its workdir; dropped", node_id, ev.artifact.path)
            ev = _as_log(ev, f"artifact rejected by the master: {ev.artifact.path!r} is outside the workdir")
        row = {"attempt_id": ev.attempt_id, "seq": ev.seq, "time": ev.time, "data": event_data(ev)}
        rows.append({**row, "type": ev.WhichOneof("body") or "log"})
    return rows


def _inside(path: str) -> bool:
    """An artifact path must be relative to the node's workdir and stay in it (checked on the node too)."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path


def _as_log(ev: infra_pb2.Event, text: str) -> infra_pb2.Event:
    out = infra_pb2.Event(attempt_id=ev.attempt_id, lease_token=ev.lease_token, seq=ev.seq, time=ev.time)
    out.log.stream, out.log.text = "agent", text
    return out


def event_data(ev: infra_pb2.Event) -> dict[str, Any]:
    body = ev.WhichOneof("body")
    if body == "metric":
        values: dict[str, float | None] = dict(ev.metric.values)
        values.update(dict.fromkeys(ev.metric.null_values))
        return {"step": ev.metric.step, "values": values}
    if body == "artifact":
        return {"path": ev.artifact.path, "kind": ev.artifact.kind}
    if body == "progress":
        p = ev.progress
        return {"what": p.what, "done": p.done, "total": p.total if p.has_total else None}
    if body == "dropped":
        d = ev.dropped
        return {
            "count": d.count,
            "logs": d.logs,
            "metrics": d.metrics,
            "progress": d.progress,
            "first_seq": d.first_seq,
            "last_seq": d.last_seq,
            "reason": d.reason,
        }
    return {"stream": ev.log.stream, "text": ev.log.text}
