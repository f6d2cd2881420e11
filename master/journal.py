"""Commits and reads for the controller's parts, and how memory comes back to what the database says.

Memory and database never disagree for long: a handler changes memory and commits the change as one
unit (:meth:`Journal.apply`); when building or committing it fails, the experiment is read back from
the database (after everything queued before it) and memory is rebuilt from it (:meth:`Journal.resync`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from infra.master import store
from infra.master.lifecycle import StageMachine
from infra.master.state import TERMINAL, ClusterState, ExperimentRt
from infra.master.store import Changes
from infra.master.writer import Writer

T = TypeVar("T")
log = logging.getLogger("infra.master")


class Journal:
    def __init__(
        self,
        state: ClusterState,
        machine: StageMachine,
        *,
        writer: Writer,
        readers: ThreadPoolExecutor,
        wake: Callable[[], None],
    ) -> None:
        self.state = state
        self.machine = machine
        self.writer = writer
        self.readers = readers
        self.wake = wake

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.readers, fn, *args)

    async def commit(self, unit: Callable[[Session], T] | Changes) -> T:
        return await asyncio.wrap_future(self.writer.submit(unit))

    def queue(self, unit: Changes) -> Future[Any]:
        """Queue a unit now, without waiting: what is queued later is committed after it."""
        return self.writer.submit(unit)

    async def apply(self, exp: ExperimentRt | None, build: Callable[[Changes, float], T]) -> T:
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
            await self.resync(ch, exp)
            raise

    async def commit_logged(self, ch: Changes, what: str) -> None:
        """Commit a change nobody waits for; one that cannot be recorded is read back."""
        try:
            await self.commit(ch)
        except Exception:
            log.exception("could not record %s; reading it back from the database", what)
            await self.resync(ch)

    async def resync(self, ch: Changes, exp: ExperimentRt | None = None) -> None:
        """Rebuild from the database every experiment a failed change touched (see :meth:`apply`)."""
        keys = {e.key for e in ch.touched} | ({exp.key} if exp is not None else set())
        for key in sorted(keys):
            try:
                await self.reload(key, wake=False)
            except Exception:
                log.exception("could not read experiment %s back from the database", key)
        # the next scheduling pass a little later: a database that refuses commits is not hammered
        asyncio.get_running_loop().call_later(1.0, self.wake)

    async def reload(self, key: str, wake: bool = True) -> ExperimentRt | None:
        """Replace an experiment in memory (finished or not) with what the database holds."""
        old = self.state.experiments.get(key)
        if old is not None:
            self.machine.drop(old)
        snap = await self.commit(lambda s: store.load_experiment(s, key))
        current = self.state.experiments.get(key)
        if current is not None:  # another reload, or a rerun, brought it back meanwhile
            self.machine.drop(current)
        if not snap.experiments:
            return None
        repairs = Changes()
        self.machine.restore(snap, repairs, time.time())
        if repairs:
            await self.commit(repairs)
        exp = self.state.experiments.get(key)
        if exp is not None and all(st.state in TERMINAL for st in exp.stages):
            self.machine.forget(exp)  # finished: memory holds unfinished experiments only
            return None
        if wake:
            self.wake()
        return exp


class Part:
    """What every part of the controller is given: the shared state, the stage machine, the journal."""

    def __init__(self, state: ClusterState, machine: StageMachine, journal: Journal) -> None:
        self.state = state
        self.machine = machine
        self.journal = journal
