"""The node's event spool: every event and final report of an attempt waits here, on disk, until the master
has acknowledged it, so that neither a master restart nor an agent restart loses or repeats anything.

One file per attempt, ``<state dir>/spool/<attempt id>.jsonl``, appended (and flushed) before an event is
sent. Each line is one record::

    {"s": seq, "t": time, "k": type, "b": body, "p": position}   an event (position: see node/runner.py)
    {"a": seq}                                                    acknowledged up to seq
    {"x": seq, "m": marker}                                       event seq dropped into the marker at seq marker
    {"h": {"seq": n, "acked": n, "p": position}}                  header written by compaction
    {"M": {...}}                                                  a drop marker, as written by compaction
    {"f": {"state": s, "exit_code": n, "message": m, "failure": c}}  the final report (c: failure class, if any)

An event's sequence number is given once, when it is spooled; a restarted agent reads the last seq and the
position after it, and continues from there (re-sending what was not acknowledged: the master stores each
(attempt, seq) once). A torn last line (the agent died while writing it) is ignored.

Limit: the unacknowledged events of all attempts may take ``limit`` bytes. Beyond it the oldest log lines
and progress events are dropped first, then the oldest metrics; artifacts, drop markers and final reports
are never dropped (they are few). Each run of drops becomes one ``dropped`` event that takes the first
dropped event's seq and counts what was dropped by type, so the loss is visible and exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

DROP_FIRST = ("log", "progress")
DROP_LATER = ("metric",)
COMPACT_MIN = 1 << 20  # rewrite an attempt's file once it holds this much dead data (and more than live)
MARKER_SIZE = 160
KIND_COUNTS = {"log": "logs", "progress": "progress", "metric": "metrics"}


@dataclass(eq=False)
class Item:
    """One spooled event (or drop marker) waiting for the master."""

    attempt: int
    lease: str
    seq: int
    type: str
    time: float
    body: dict[str, Any]
    size: int
    inflight: bool = False
    gone: bool = False  # acknowledged, or dropped


@dataclass(eq=False)
class AttemptSpool:
    attempt_id: int
    lease: str
    path: Path
    fh: IO[bytes] | None = None
    seq: int = 0
    acked: int = 0
    position: dict[str, int] | None = None
    final: dict[str, Any] | None = None
    pending: int = 0  # items not yet acknowledged
    live: int = 0  # their bytes
    dead: int = 0  # bytes in the file that no longer matter
    marker: Item | None = None  # the open drop marker further drops merge into
    items: deque[Item] = field(default_factory=deque)  # pending ones, in seq order (for compaction)


@dataclass(frozen=True)
class Recovered:
    """What a restarted agent needs about an attempt: where its event stream stands and how it ended."""

    last_seq: int
    position: dict[str, int] | None
    final: dict[str, Any] | None


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


class Spool:
    def __init__(self, directory: Path, limit: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self._cond = threading.Condition()
        self._attempts: dict[int, AttemptSpool] = {}
        self._items: list[Item] = []  # all pending items, oldest first (tombstones until compacted)
        self._gone = 0  # tombstones in _items (acknowledged, dropped or discarded items)
        self._head = 0
        self._scan = {DROP_FIRST: 0, DROP_LATER: 0}  # where the search for the oldest droppable resumes
        self.live = 0
        self.dropped = 0  # events dropped since the agent started
        self._dirty: set[int] = set()
        self._unflushed: set[IO[bytes]] = set()  # files with drop records written by this add

    # --- attempts ------------------------------------------------------------------------------

    def open(self, attempt_id: int, lease: str) -> Recovered:
        """Start spooling an attempt, or pick up what a previous agent process spooled for it."""
        with self._cond:
            if attempt_id in self._attempts:
                a = self._attempts[attempt_id]
                return Recovered(a.seq, a.position, a.final)
            path = self.dir / f"{attempt_id}.jsonl"
            a = AttemptSpool(attempt_id, lease, path)
            if path.exists():
                self._load(a)
                self._compact(a)
            else:
                a.fh = path.open("ab")
            self._attempts[attempt_id] = a
            return Recovered(a.seq, a.position, a.final)

    def on_disk(self) -> list[int]:
        """Attempts with spool files on disk (what a restarted agent must account for)."""
        return sorted(int(p.stem) for p in self.dir.glob("*.jsonl") if p.stem.isdigit())

    def remove_file(self, attempt_id: int) -> None:
        """Delete the spool file of an attempt that is not open (one whose assignment is gone)."""
        with self._cond:
            if attempt_id not in self._attempts:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f"{attempt_id}.jsonl").unlink()

    def _load(self, a: AttemptSpool) -> None:
        events: dict[int, dict[str, Any]] = {}
        markers: dict[int, dict[str, Any]] = {}
        with a.path.open("rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    break  # torn last line
                if "s" in rec:
                    events[rec["s"]] = rec
                    a.seq, a.position = max(a.seq, rec["s"]), rec["p"]
                elif "a" in rec:
                    a.acked = max(a.acked, rec["a"])
                elif "x" in rec:
                    ev = events.pop(rec["x"], None)
                    m = markers.setdefault(rec["m"], _marker_body(rec["m"]))
                    _count(m, ev["k"] if ev else "log", rec["x"])
                elif "h" in rec:
                    a.seq, a.acked, a.position = rec["h"]["seq"], rec["h"]["acked"], rec["h"]["p"]
                elif "M" in rec:
                    markers[rec["M"]["first_seq"]] = rec["M"]
                elif "f" in rec:
                    a.final = rec["f"]
        pending = [
            Item(a.attempt_id, a.lease, s, r["k"], r["t"], r["b"], len(_line(r)))
            for s, r in events.items()
            if s > a.acked
        ]
        pending += [
            Item(a.attempt_id, a.lease, s, "dropped", time.time(), m, MARKER_SIZE)
            for s, m in markers.items()
            if s > a.acked
        ]
        for it in sorted(pending, key=lambda i: i.seq):
            self._push(a, it)

    def _push(self, a: AttemptSpool, it: Item) -> None:
        self._items.append(it)
        a.items.append(it)
        a.pending += 1
        a.live += it.size
        self.live += it.size

    # --- writing -------------------------------------------------------------------------------

    def add(self, attempt_id: int, type_: str, body: dict[str, Any], position: dict[str, int] | None) -> int:
        """Spool one event (on disk before it can be sent); returns its seq (0: the attempt was discarded)."""
        with self._cond:
            a = self._attempts.get(attempt_id)
            if a is None:
                return 0
            a.seq += 1
            now = time.time()
            if position is not None:
                a.position = dict(position)
            record = {"s": a.seq, "t": round(now, 6), "k": type_, "b": body, "p": a.position}
            data = _line(record)
            assert a.fh is not None
            a.fh.write(data)
            self._dirty.add(attempt_id)
            self._push(a, Item(attempt_id, a.lease, a.seq, type_, now, body, len(data)))
            if self.live > self.limit:
                self._drop_oldest()
                self._trim()
            for f in {a.fh, *self._unflushed}:
                f.flush()  # in the kernel before it can be sent: an agent crash loses nothing sent
            self._unflushed.clear()
            self._cond.notify_all()
            return a.seq

    def finish(self, attempt_id: int, state: str, exit_code: int, message: str, failure: str = "") -> None:
        """Record the attempt's final report (``failure``: its failure class when it failed or was cancelled);
        it is sent once every event before it is acknowledged."""
        with self._cond:
            a = self._attempts.get(attempt_id)
            if a is None:
                return
            a.final = {"state": state, "exit_code": exit_code, "message": message}
            if failure:
                a.final["failure"] = failure
            assert a.fh is not None
            a.fh.write(_line({"f": a.final}))
            a.fh.flush()
            os.fsync(a.fh.fileno())
            self._cond.notify_all()

    def last_seq(self, attempt_id: int) -> int:
        with self._cond:
            a = self._attempts.get(attempt_id)
            return a.seq if a else 0

    def _drop_oldest(self) -> None:
        for kinds in (DROP_FIRST, DROP_LATER):
            i = max(self._scan[kinds], self._head)
            while self.live > self.limit and i < len(self._items):
                it = self._items[i]
                if not it.gone and not it.inflight and it.type in kinds:
                    self._drop(i, it)
                i += 1
            self._scan[kinds] = i
            if self.live <= self.limit:
                return

    def _drop(self, index: int, it: Item) -> None:
        a = self._attempts[it.attempt]
        it.gone = True
        self._gone += 1
        a.pending -= 1
        a.live -= it.size
        self.live -= it.size
        a.dead += it.size
        self.dropped += 1
        marker = a.marker
        if marker is None or marker.inflight or marker.gone:
            marker = Item(it.attempt, it.lease, it.seq, "dropped", it.time, _marker_body(it.seq), MARKER_SIZE)
            self._items[index] = marker  # takes the dropped event's place (and seq)
            self._gone -= 1  # the dropped item left _items
            a.items[a.items.index(it)] = marker
            a.pending += 1
            a.live += MARKER_SIZE
            self.live += MARKER_SIZE
            a.marker = marker
        else:
            a.items.remove(it)
        _count(marker.body, it.type, it.seq)
        it.body = {}  # never sent: only the tombstone is left
        assert a.fh is not None
        a.fh.write(_line({"x": it.seq, "m": marker.seq}))
        self._unflushed.add(a.fh)
        if a.dead > max(COMPACT_MIN, a.live):
            self._compact(a)

    # --- sending -------------------------------------------------------------------------------

    def take(self, max_items: int, wait: float) -> list[Item]:
        """The oldest unsent items (up to ``max_items``), marked in flight; waits up to ``wait`` for some."""
        with self._cond:
            if not self._sendable():
                self._cond.wait(wait)
            out: list[Item] = []
            i = self._head
            while i < len(self._items) and len(out) < max_items:
                it = self._items[i]
                i += 1
                if it.gone or it.inflight:
                    continue
                it.inflight = True
                a = self._attempts[it.attempt]
                if a.marker is it:
                    a.marker = None  # a marker on its way is not changed any more
                out.append(it)
            return out

    def _sendable(self) -> bool:
        while self._head < len(self._items) and self._items[self._head].gone:
            self._head += 1
        for i in range(self._head, len(self._items)):
            it = self._items[i]
            if not it.gone and not it.inflight:
                return True
        return any(a.final is not None and a.pending == 0 for a in self._attempts.values())

    def release(self, items: list[Item]) -> None:
        """A send failed: the items go out again with the next batch."""
        with self._cond:
            for it in items:
                it.inflight = False

    def acked(self, items: list[Item], rejected: set[int]) -> None:
        """The master stored (or already had) these items; ``rejected`` attempts are no longer current there."""
        with self._cond:
            upto: dict[int, int] = {}
            for it in items:
                it.inflight = False
                a = self._attempts.get(it.attempt)
                if it.gone or a is None:
                    continue
                it.gone = True
                self._gone += 1
                a.pending -= 1
                a.live -= it.size
                self.live -= it.size
                a.dead += it.size
                if a.items and a.items[0] is it:
                    a.items.popleft()
                else:
                    a.items.remove(it)
                upto[it.attempt] = max(upto.get(it.attempt, 0), it.seq)
            for attempt_id, seq in upto.items():
                a = self._attempts[attempt_id]
                a.acked = max(a.acked, seq)
                assert a.fh is not None
                a.fh.write(_line({"a": a.acked}))
                a.fh.flush()
                if a.dead > max(COMPACT_MIN, a.live):
                    self._compact(a)
            for attempt_id in rejected:
                self._discard(attempt_id)
            self._trim()
            self._cond.notify_all()

    def _trim(self) -> None:
        """Remove the tombstones from ``_items`` once they are most of it, so that memory follows what is
        pending, not everything ever spooled (a flood dropped while the master is away, the oldest item
        still in flight); amortized O(1) per item."""
        if self._gone <= 4096 or self._gone * 2 <= len(self._items):
            return
        self._items = [it for it in self._items if not it.gone]
        self._gone, self._head = 0, 0
        self._scan = dict.fromkeys(self._scan, 0)

    def finals(self) -> list[tuple[int, str, dict[str, Any]]]:
        """(attempt, lease, final report) of attempts whose events are all acknowledged."""
        with self._cond:
            return [(a.attempt_id, a.lease, a.final) for a in self._attempts.values() if a.final and a.pending == 0]

    def done(self, attempt_id: int) -> None:
        """The master has the final report: forget the attempt."""
        with self._cond:
            self._discard(attempt_id)
            self._cond.notify_all()

    def _discard(self, attempt_id: int) -> None:
        a = self._attempts.pop(attempt_id, None)
        if a is None:
            return
        for it in a.items:
            if not it.gone:
                it.gone = True
                self._gone += 1
                self.live -= it.size
        if a.fh is not None:
            a.fh.close()
        with contextlib.suppress(FileNotFoundError):
            a.path.unlink()
        self._dirty.discard(attempt_id)

    def discard(self, attempt_id: int) -> None:
        """Forget an attempt the master no longer wants (a stale lease): its events would be refused."""
        with self._cond:
            self._discard(attempt_id)
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing left to send: no pending event, no final report."""
        with self._cond:
            return not any(a.pending or a.final for a in self._attempts.values())

    def sync(self) -> None:
        """fsync what was written since the last call (the agent calls this about once a second): a crash
        of the agent loses nothing flushed, a power loss at most the last second."""
        with self._cond:
            dirty = [fh for i in self._dirty if i in self._attempts and (fh := self._attempts[i].fh) is not None]
            self._dirty.clear()
        for fh in dirty:
            with contextlib.suppress(OSError, ValueError):
                os.fsync(fh.fileno())

    def _compact(self, a: AttemptSpool) -> None:
        """Rewrite an attempt's file with only what still matters."""
        tmp = a.path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            fh.write(_line({"h": {"seq": a.seq, "acked": a.acked, "p": a.position}}))
            for it in a.items:
                if it.type == "dropped":
                    fh.write(_line({"M": it.body}))
                else:
                    fh.write(_line({"s": it.seq, "t": it.time, "k": it.type, "b": it.body, "p": a.position}))
            if a.final is not None:
                fh.write(_line({"f": a.final}))
            fh.flush()
            os.fsync(fh.fileno())
        if a.fh is not None:
            self._unflushed.discard(a.fh)
            a.fh.close()
        tmp.replace(a.path)
        a.fh = a.path.open("ab")
        a.dead = 0


def _marker_body(seq: int) -> dict[str, Any]:
    return {
        "count": 0,
        "logs": 0,
        "metrics": 0,
        "progress": 0,
        "first_seq": seq,
        "last_seq": seq,
        "reason": "the node's event spool was full (the master was unreachable or slower than the stage)",
    }


def _count(marker: dict[str, Any], kind: str, seq: int) -> None:
    marker["count"] += 1
    marker[KIND_COUNTS.get(kind, "logs")] += 1
    marker["last_seq"] = max(marker["last_seq"], seq)
