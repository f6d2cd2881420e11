"""The node registry: registration, heartbeats, lost nodes, drains, and each node's command stream.

Heartbeats touch memory only (every node's last usage is written for all of them every persist
interval); a node silent for the lost timeout is lost and its attempts fail as ``node_lost``; an
experiment whose home node stays lost past ``home_wait`` starts over elsewhere. Commands go to a node
through the queue of its one open stream, as plain values (:class:`~master.state.AttemptRt` to run,
:class:`~master.state.Stop`); the servicers turn them into messages.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from infra.master import store
from infra.master.config import ControllerOptions
from infra.master.errors import NotFound
from infra.master.journal import Journal, Part
from infra.master.lifecycle import CANCELLED_CLASS, NODE_LOST, PREEMPTED, StageMachine
from infra.master.state import (
    ASSIGNED,
    CANCELLED,
    FAILED,
    PENDING,
    READY,
    RUNNING,
    SUCCEEDED,
    ClusterState,
    Command,
    ExperimentRt,
    NodeRt,
    Stop,
)
from infra.master.store import Changes

log = logging.getLogger("infra.master")
HEARTBEAT_ROWS_PER_COMMIT = 1000  # the periodic write of the last heartbeats goes in parts of this many nodes
REGISTRATION_LOG_S = 1.0  # in a burst of registrations, one is logged in full per this many seconds


@dataclass(frozen=True, kw_only=True)
class Beat:
    """What a heartbeat answers: register again, or the attempts it runs whose lease is gone."""

    reregister: bool = False
    revoked: list[int] = field(default_factory=list)


class NodeRegistry(Part):
    def __init__(
        self,
        state: ClusterState,
        machine: StageMachine,
        journal: Journal,
        *,
        options: ControllerOptions,
        wake: Callable[[], None],
        usage_row: Callable[[Any], Any],
    ) -> None:
        super().__init__(state, machine, journal)
        self.wake = wake
        self.usage_row = usage_row  # a node's usage as stored; run in the writer thread
        self.heartbeat_interval = options.heartbeat_interval
        self.lost_timeout = options.lost_after()
        self.home_wait = options.home_wait
        self.started = time.time()  # nodes restored from the database get the lost timeout from here
        self._logged_at = 0.0  # when a registration was last logged in full (time.monotonic)
        self._unlogged = 0  # registrations since, counted for one line

    @staticmethod
    def from_facts(node_id: str, facts: dict[str, Any]) -> NodeRt:
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

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Every node the database knows, not registered with this master process yet."""
        for n in rows:
            node = self.state.nodes[n["id"]] = self.from_facts(n["id"], n["facts"])
            self.state.facts_version += 1
            node.drained, node.drain_deadline = bool(n.get("drained")), n.get("drain_deadline")

    # --- registration and heartbeats -------------------------------------------------------------

    async def register(
        self, node_id: str, protocol_version: int, facts: dict[str, Any], running: list[tuple[int, str]]
    ) -> NodeRt:
        """``running``: (attempt id, lease) of what the node still runs; what the master no longer wants of
        it is cancelled when its command stream opens."""
        if not node_id:
            raise ValueError("node_id is required (the agent keeps it in its workdir)")
        now = time.time()
        node = self.from_facts(node_id, facts)
        row = {
            "id": node.id,
            "name": node.name,
            "hostname": facts.get("hostname", ""),
            "protocol_version": protocol_version,
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
        # Registrations queued together are written as one merged unit (store.Registrations), in the order
        # of the writer's queue like every other unit, so a registration is still committed before anything
        # queued after it; merging changes only how many statements carry it.
        await self.journal.commit(store.Registrations().add(row, gpus))
        # The session is given, and the lost clock starts, only once the row is committed: under a burst of
        # registrations the commit takes seconds, and a node cannot heartbeat before it has its session.
        old = self.state.nodes.get(node.id)
        if old is not None:  # keep allocations, the open stream and an operator's drain
            node.attempts, node.queue = old.attempts, old.queue
            node.drained, node.drain_deadline = old.drained, old.drain_deadline
            for att in old.attempts.values():
                node.allocate(att)
            if old.lost:
                log.info("lost node %s (%s) is back", node.name, node.id)
                self._logged_at = 0.0  # and its registration is logged in full
        node.session = secrets.randbits(62) or 1
        node.last_heartbeat = time.time()
        self.state.nodes[node.id] = node
        self.state.facts_version += 1
        for attempt_id, lease in running:
            if self.state.current(node.id, attempt_id, lease) is None:
                node.pending_cancels.append((attempt_id, lease))
        self._log_registration(node)
        self.wake()
        return node

    def _log_registration(self, node: NodeRt) -> None:
        """One line per registration, except in a burst (every node of a restarted master registers at
        once): there the first of each ``REGISTRATION_LOG_S`` is logged in full and the rest counted, since
        formatting and writing thousands of lines on the loop would delay every heartbeat."""
        now = time.monotonic()
        if now - self._logged_at >= REGISTRATION_LOG_S:
            self._logged_at = now
            cpus, mem, gpus = node.cpus, node.memory_mib, node.gpus
            log.info("node %s (%s) registered: %s cpus, %s MiB, gpus %s", node.name, node.id, cpus, mem, gpus)
            return
        log.debug("node %s (%s) registered", node.name, node.id)
        self._unlogged += 1
        if self._unlogged == 1:
            asyncio.get_running_loop().call_later(REGISTRATION_LOG_S, self._log_burst)

    def _log_burst(self) -> None:
        log.info(
            "%d more node(s) registered in the last %gs (%d known)",
            self._unlogged,
            REGISTRATION_LOG_S,
            len(self.state.nodes),
        )
        self._unlogged = 0

    def heartbeat(
        self, node_id: str, session: int, *, usage: Any, running: list[tuple[int, str]], unavailable: str
    ) -> Beat:
        """Memory only: the last usage is persisted periodically by :meth:`flush_heartbeats`. Attempts the
        node still runs whose lease is gone (the node was lost meanwhile) come back as ``revoked``."""
        node = self.state.nodes.get(node_id)
        if node is None or node.session != session or node.lost:
            return Beat(reregister=True)
        now = time.time()
        node.last_heartbeat = now
        node.usage = usage
        node.heartbeat_dirty = True
        if node.beat_at is not None:
            self._fail_missing(node, {attempt_id for attempt_id, _ in running}, now)
        node.beat_at = now
        if node.unavailable != unavailable:
            node.unavailable = unavailable
            if unavailable:
                log.warning("node %s takes no new stages: %s", node.name, unavailable)
            else:
                self.wake()
        revoked = [a for a, lease in running if self.state.current(node.id, a, lease) is None]
        return Beat(revoked=revoked)

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
            if att.stop_at is not None:  # a gang member told to stop: gone as told, which says nothing of the cause
                self.machine.finish(att, CANCELLED, -1, att.stop_why, ch, now, CANCELLED_CLASS)
                continue
            why = "the node no longer runs this attempt (its agent restarted without it)"
            self.machine.finish(att, FAILED, -1, why, ch, now, NODE_LOST)
        asyncio.ensure_future(self.journal.commit_logged(ch, f"failing {len(gone)} attempt(s) gone from {node.name}"))

    def heard_from(self, node_id: str) -> None:
        """Any report is a sign of life: a master slow to get to a node's heartbeat must not lose it."""
        node = self.state.nodes.get(node_id)
        if node is not None and node.session and not node.lost:
            node.last_heartbeat = time.time()

    async def flush_heartbeats(self) -> None:
        """Collects the changed nodes on the loop (cheap) and converts their usage in the writer thread:
        turning 1,000 messages into dicts on the loop would stall every call for tens of milliseconds."""
        changed = []
        for n in self.state.nodes.values():
            if n.heartbeat_dirty and n.last_heartbeat is not None:
                n.heartbeat_dirty = False
                changed.append((n.id, n.last_heartbeat, n.usage))
        usage_row = self.usage_row

        def save(part: list[tuple[str, float, Any]], s: Session) -> None:
            rows = [
                {"id": node_id, "last_seen_at": seen, "usage": usage_row(usage) if usage is not None else None}
                for node_id, seen, usage in part
            ]
            store.save_heartbeats(s, rows)

        # In parts, each committed before the next is queued: 10,000 nodes' rows in one unit held the single
        # writer for seconds, and every registration and assignment waiting behind it.
        for start in range(0, len(changed), HEARTBEAT_ROWS_PER_COMMIT):
            await self.journal.commit(functools.partial(save, changed[start : start + HEARTBEAT_ROWS_PER_COMMIT]))

    def online(self, node: NodeRt) -> bool:
        hb = node.last_heartbeat
        return node.queue is not None and not node.lost and hb is not None and time.time() - hb < self.lost_timeout

    def node_state(self, node: NodeRt) -> str:
        return "lost" if node.lost else "online" if self.online(node) else "offline"

    # --- the command stream ------------------------------------------------------------------------

    async def commands(self, node_id: str, session: int) -> AsyncIterator[Command]:
        """The node's command stream: re-sends what it may have missed, then new commands as they come."""
        node = self.state.nodes.get(node_id)
        if node is None or node.session != session:
            raise NotFound("unknown node session: register first")
        q: asyncio.Queue[Command | None] = asyncio.Queue()
        node.queue = q
        for att in node.attempts.values():
            if att.state == ASSIGNED:
                q.put_nowait(att)
            if att.stage.exp.cancel_requested:
                q.put_nowait(Stop(attempt_id=att.id, lease=att.lease, reason="experiment cancelled"))
            elif att.stop_at is not None:  # a member of an ending gang, told while its node was away
                q.put_nowait(Stop(attempt_id=att.id, lease=att.lease, reason=att.stop_why))
        for att_id, lease in node.pending_cancels:
            q.put_nowait(Stop(attempt_id=att_id, lease=lease, reason="this attempt is not current at the master"))
        node.pending_cancels.clear()
        self.wake()
        try:
            while (command := await q.get()) is not None:
                yield command
        finally:
            if node.queue is q:
                node.queue = None

    # --- lost nodes and drain deadlines ------------------------------------------------------------

    async def check_nodes(self) -> None:
        """Declare nodes whose heartbeats stopped lost (their attempts fail, retry policy applies) and give
        experiments whose home node stayed lost past ``home_wait`` a new home."""
        now = time.time()
        ch = Changes()
        try:
            stops = self._check_nodes(ch, now)
            if ch:
                await self.journal.commit(ch)
        except Exception:
            await self.journal.resync(ch)
            raise
        for node, command in stops:  # after the commit: the attempt is already ended at the master
            if node.queue is not None:
                node.queue.put_nowait(command)

    def _check_nodes(self, ch: Changes, now: float) -> list[tuple[NodeRt, Stop]]:
        # runs every second over every node: nodes heard from within the timeout, nearly all of them, cost
        # one comparison (10,000 nodes in a few milliseconds of the loop)
        recent = now - self.lost_timeout
        stops: list[tuple[NodeRt, Stop]] = []
        for node in self.state.nodes.values():
            heard = node.last_heartbeat
            # attempts on a lost node: read back after a failed commit
            if (heard is None or heard < recent) and (node.lost_at is None or node.attempts):
                # a node not heard from since this master started gets twice the timeout: after a master
                # restart every node must notice, reconnect (with backoff) and register again
                silent = now - (heard or self.started)
                if silent > (self.lost_timeout if heard else 2 * self.lost_timeout):
                    self._lose(node, silent, ch, now)
            if node.drained and node.drain_deadline is not None and now >= node.drain_deadline and node.attempts:
                stops += self._preempt(node, ch, now)
        self._end_unstopped(ch, now)
        for exp in list(self.state.experiments.values()):
            home = self.state.nodes.get(exp.home_node) if exp.home_node else None
            if exp.shared_workdir or home is None or not home.lost or now - (home.lost_at or now) < self.home_wait:
                continue
            self._rehome(exp, home, ch, now)
        return stops

    def _end_unstopped(self, ch: Changes, now: float) -> None:
        """A gang waits for every member to end before it is decided; a member whose node still heartbeats
        but has not ended it within the lost timeout of its Stop is ended here, as cancelled (no vote). One
        whose node went silent is left to the lost timeout, which ends it as ``node_lost`` (a vote), so the
        wait is bounded either way."""
        for att in list(self.state.stopping.values()):
            node = self.state.nodes.get(att.node_id)
            stop_at = att.stop_at or now
            if now - stop_at <= self.lost_timeout:
                continue
            if node is not None and not node.lost and (node.last_heartbeat or 0) <= stop_at:
                continue  # silent since the Stop: the lost timeout decides
            why = f"{att.stop_why}; not ended by its node within {self.lost_timeout:g}s, cancelled by the master"
            self.machine.finish(att, CANCELLED, -1, why, ch, now, CANCELLED_CLASS)

    def _lose(self, node: NodeRt, silent: float, ch: Changes, now: float) -> None:
        if node.session or node.attempts:  # not the nodes of earlier days that never came back
            log.warning("node %s (%s) lost: no heartbeat for %.1fs", node.name, node.id, silent)
        node.lost_at = node.lost_at or now  # already lost: attempts read back after a failed commit
        node.session = 0  # its next call must re-register, which reconciles what it still runs
        if node.queue is not None:
            node.queue.put_nowait(None)  # ends its command stream
        why = f"node {node.name} lost: no heartbeat for {silent:.1f}s"
        for att in list(node.attempts.values()):
            self.machine.finish(att, FAILED, -1, why, ch, now, NODE_LOST)

    def _preempt(self, node: NodeRt, ch: Changes, now: float) -> list[tuple[NodeRt, Stop]]:
        """A drained node's deadline has passed: what still runs there ends as ``preempted`` (retried
        elsewhere within that budget) and the node is told to stop its copy, whose lease is then gone."""
        why = f"node {node.name} drained: its deadline passed before the attempt ended"
        log.warning("node %s: drain deadline passed; preempting %d attempt(s)", node.name, len(node.attempts))
        stops = []
        for att in list(node.attempts.values()):
            stops.append((node, Stop(attempt_id=att.id, lease=att.lease, reason=why)))
            self.machine.finish(att, FAILED, -1, why, ch, now, PREEMPTED)
        return stops

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
                self.machine.move(st, target, why, ch, now)
        self.machine.update_experiment(exp, ch, now)
        self.wake()

    # --- operator controls ---------------------------------------------------------------------------

    def find(self, ref: str) -> NodeRt:
        node = self.state.nodes.get(ref) or next((n for n in self.state.nodes.values() if n.name == ref), None)
        if node is None:
            raise NotFound(f"no node {ref!r} (infra node list shows them)")
        return node

    async def drain(self, ref: str, undrain: bool = False, deadline_s: float = 0.0) -> NodeRt:
        """Drain a node (no new stages; running ones finish, or after ``deadline_s`` are preempted) or take
        it back. Persisted before memory changes, so a master restart keeps it."""
        node = self.find(ref)
        drained = not undrain
        deadline = time.time() + deadline_s if drained and deadline_s > 0 else None
        await self.journal.commit(lambda s: store.set_drain(s, node.id, drained, deadline))
        node.drained, node.drain_deadline = drained, deadline
        log.info("node %s %s", node.name, "drained" if drained else "undrained")
        self.wake()
        return node
