"""What nodes report: an attempt's state (running, then how it ended) and its events, fenced by lease.

A report is taken only from the node that holds the attempt, under its lease, while it is its stage's
current attempt: a copy the master has given up on (its node was lost, it was cancelled, retried) is
refused, and the node kills it. Events are fenced on the loop (a lookup each) and turned into rows in
the writer thread, where a repeated ``(attempt, seq)`` is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine

from infra.master import store
from infra.master.journal import Journal, Part
from infra.master.lifecycle import CANCELLED_CLASS, ERROR, StageMachine
from infra.master.state import ASSIGNED, CANCELLED, FAILED, RUNNING, SUCCEEDED, TERMINAL, ClusterState
from infra.master.store import Changes

E = TypeVar("E")
MAX_PROGRESS_NAMES = 8  # progress names kept per attempt (a stage reports one or two)


@dataclass(frozen=True, kw_only=True)
class StatusReport:
    """A node's report on one of its attempts."""

    node_id: str
    attempt_id: int
    lease: str
    state: str  # a stage state name, or what the node sent if it is none (refused, named)
    exit_code: int = 0
    message: str = ""
    failure_class: str = ""  # of a failed attempt; "" is the stage's own ``error``


class Intake(Part):
    def __init__(
        self,
        state: ClusterState,
        machine: StageMachine,
        journal: Journal,
        *,
        engine: Engine,
        heard_from: Callable[[str], None],
    ) -> None:
        super().__init__(state, machine, journal)
        self.engine = engine
        self.heard_from = heard_from  # any report is a sign of life of its node
        self._events_tick = asyncio.Event()

    async def report_status(self, rep: StatusReport) -> tuple[bool, str]:
        """(accepted, why not)."""
        node_id, attempt_id, lease, state = rep.node_id, rep.attempt_id, rep.lease, rep.state
        self.heard_from(node_id)
        att = self.state.current(node_id, attempt_id, lease)
        if att is None:
            # a repeated final report whose first acknowledgement was lost, for an experiment that has
            # since finished (and left memory): the database says whether it is already recorded
            row = await self.journal.read(store.attempt_brief, self.engine, attempt_id)
            if row == (lease, node_id, state):
                return True, "already recorded"
            return False, "stale lease: this attempt is not current at the master"
        if state == att.state:
            return True, "already recorded"
        if att.state in TERMINAL:
            return False, f"attempt already {att.state}"
        if state not in (RUNNING, SUCCEEDED, FAILED, CANCELLED) or (state == RUNNING and att.state != ASSIGNED):
            return False, f"invalid report {state!r} for an attempt that is {att.state}"
        cls = ""
        if state == CANCELLED:
            cls = CANCELLED_CLASS
        elif state == FAILED:
            cls = rep.failure_class or ERROR

        def build(ch: Changes, now: float) -> None:
            if state == RUNNING:
                att.state, att.started_at = RUNNING, now
                ch.attempts.append({"id": att.id, "state": RUNNING, "started_at": now})
                ch.touched.add(att.stage.exp)
                st = att.stage
                if st.state != ASSIGNED or any(m.state not in (RUNNING, SUCCEEDED) for m in st.members):
                    return  # a gang runs once all its members do
                names = ", ".join(n.name if (n := self.state.nodes.get(m.node_id)) else m.node_id for m in st.members)
                self.machine.move(st, RUNNING, f"attempt {att.number} started on {names}", ch, now, att)
                self.machine.update_experiment(st.exp, ch, now)
            else:
                self.machine.finish(att, state, rep.exit_code, rep.message, ch, now, cls)

        await self.journal.apply(att.stage.exp, build)
        return True, ""

    async def report_events(
        self,
        node_id: str,
        events: Sequence[E],
        *,
        lease_of: Callable[[E], tuple[int, str]],
        rows: Callable[[list[E]], list[dict[str, Any]]],
    ) -> tuple[int, list[int]]:
        """(events stored, attempts refused). ``lease_of`` says an event's (attempt id, lease); ``rows``
        turns the accepted ones into rows, in the writer thread (too slow for the loop in bulk)."""
        self.heard_from(node_id)
        accepted, rejected = [], set()
        for ev in events:
            attempt_id, lease = lease_of(ev)
            if self.state.current(node_id, attempt_id, lease) is None:
                rejected.add(attempt_id)
            else:
                accepted.append(ev)
        stored = await self.journal.commit(lambda s: store.insert_events(s, rows(accepted))) if accepted else 0
        if accepted:
            tick, self._events_tick = self._events_tick, asyncio.Event()
            tick.set()
        return stored, sorted(rejected)

    def progress(self, node_id: str, attempt_id: int, lease: str, what: str, done: int, total: int | None) -> None:
        """Keep an attempt's latest progress per ``what`` in memory only (status shows it while the stage runs;
        the events themselves are stored like any other). A few names per attempt at most."""
        att = self.state.current(node_id, attempt_id, lease)
        if att is not None and (what in att.progress or len(att.progress) < MAX_PROGRESS_NAMES):
            att.progress[what] = (done, total)

    async def wait_for_events(self, timeout: float) -> None:
        """Return when new events were stored (or after ``timeout``): how ``logs --follow`` waits."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._events_tick.wait(), timeout)
