"""The database's single writer thread, with group commit.

Everything the master changes goes through here, in order: many small units of work (an assignment,
a status report, a batch of events) queued within a few milliseconds are committed as one
transaction, which is what lets one SQLite file keep up with hundreds of stage changes per second.
If a batch fails, its units are replayed one transaction each so that only the faulty one fails.

A unit is applied even when the call that queued it has gone away (its future cancelled, e.g. by the
client's deadline): the master's memory already holds the change, so the database must too.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from infra.master.store import Changes, Registrations

T = TypeVar("T")
Mergeable = Changes | Registrations  # units that the writer merges with the same kind queued next to them
log = logging.getLogger("infra.master.writer")
MAX_BATCH = 256


class Writer:
    def __init__(self, engine: Engine, on_commit: Callable[[list[Any], float], None] | None = None) -> None:
        """``on_commit(units, seconds)`` hears of every committed transaction, in this thread (metrics)."""
        self.engine = engine
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue[tuple[Callable[[Session], Any] | Mergeable, Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="db-writer", daemon=True)
        self._thread.start()

    def submit(self, unit: Callable[[Session], T] | Mergeable) -> Future[T]:
        """Queue a unit of work (a function of the session, a :class:`Changes` or :class:`Registrations`);
        its future resolves once it is committed."""
        fut: Future[T] = Future()
        self._queue.put((unit, fut))
        return fut

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._commit(batch)
            except Exception:  # never let the only writer die: every later commit would wait forever
                log.exception("database writer")

    def _commit(self, batch: list[tuple[Callable[[Session], Any] | Mergeable, Future[Any]]]) -> None:
        started = time.perf_counter()
        try:
            with Session(self.engine) as session, session.begin():
                results = self._apply(session, [unit for unit, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                log.error("database write failed: %s", exc)
                with contextlib.suppress(InvalidStateError):  # cancelled: the caller went away
                    batch[0][1].set_exception(exc)
                return
            for item in batch:  # isolate the faulty unit
                self._commit([item])
            return
        if self.on_commit is not None:
            try:
                self.on_commit([unit for unit, _ in batch], time.perf_counter() - started)
            except Exception:  # an observer never costs a commit its acknowledgement
                log.exception("commit observer")
        for (_, fut), result in zip(batch, results, strict=True):
            with contextlib.suppress(InvalidStateError):  # the caller went away; the change is committed anyway
                fut.set_result(result)

    @staticmethod
    def _apply(session: Session, units: list[Callable[[Session], Any] | Mergeable]) -> list[Any]:
        """Run the units in order; consecutive units of one mergeable kind (state changes, registrations)
        are merged into one application, which keeps the order of everything else around them."""
        results: list[Any] = []
        merged: Mergeable | None = None
        for unit in units:
            if isinstance(unit, Changes | Registrations):
                if merged is not None and type(merged) is not type(unit):
                    merged.apply(session)
                    merged = None
                merged = merged if merged is not None else type(unit)()
                merged.extend(unit)  # the same kind: checked above
                results.append(None)
                continue
            if merged is not None:
                merged.apply(session)
                merged = None
            results.append(unit(session))
        if merged is not None:
            merged.apply(session)
        return results
