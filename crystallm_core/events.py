"""The one way stages report metrics, artifacts and progress: JSON lines in ``events.jsonl``.

Each line is one object with ``seq`` (1, 2, ... per file), ``time`` (Unix seconds), ``type``
and the fields of that type:

* ``metric``: ``step`` (int) and ``values`` (name -> number), e.g. loss, lr, tokens_per_s;
* ``artifact``: ``path`` (relative to the directory holding ``events.jsonl``), ``kind``
  (checkpoint, samples, data, report, plot, ...);
* ``progress``: ``what``, ``done`` and ``total`` (``total`` may be null).

Lines are flushed one by one so that a follower (the node agent) can tail the file while the
stage runs. A stage run by the node agent gets ``CRYSTALLM_EVENTS`` in its environment, the path
every ``crystallm`` verb then writes to (``metrics/<stage>.jsonl`` of the experiment record); run
by hand, ``crystallm train`` writes ``RUN/metrics/train.jsonl`` and the other verbs ``events.jsonl``
into their output directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ENV_VAR = "CRYSTALLM_EVENTS"
FILENAME = "events.jsonl"
PROGRESS_EVERY_S = 0.5  # at most two progress events a second: the node ships every line, the master keeps the last


def _finite(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None  # JSON has no NaN; a diverged loss is reported as null


class JsonlSink:
    """Appends events to a JSON-lines file, continuing its sequence numbers if it exists."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.base = self.path.parent
        self.seq = 0
        if self.path.exists():
            with self.path.open("rb") as fh:
                for line in fh:
                    try:
                        self.seq = max(self.seq, int(json.loads(line)["seq"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn last line after a crash
        self._fh = self.path.open("a", encoding="utf-8")

    def emit(self, type_: str, **fields: Any) -> None:
        self.seq += 1
        record = {"seq": self.seq, "time": round(time.time(), 6), "type": type_, **fields}
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def metric(self, step: int, **values: float) -> None:
        self.emit("metric", step=int(step), values={k: _finite(v) for k, v in values.items()})

    def artifact(self, path: str | Path, kind: str) -> None:
        """Record ``path`` (absolute, or relative to the current directory, like any file name) relative to
        this file's directory when it lies below it; absolute otherwise, for the shipper to judge."""
        p = Path(path).absolute()
        if p.resolve().is_relative_to(self.base.resolve()):
            p = p.resolve().relative_to(self.base.resolve())
        self.emit("artifact", path=p.as_posix(), kind=kind)

    def progress(self, what: str, done: int, total: int | None) -> None:
        self.emit("progress", what=what, done=int(done), total=None if total is None else int(total))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressReporter:
    """One piece of work's progress: ``progress`` events at most every ``every`` seconds (the first update at
    once, the last state on exit), and a rich bar on stderr when it is a terminal (nothing in logs otherwise).
    Call :meth:`update` as often as convenient; it is cheap between events."""

    def __init__(
        self, sink: JsonlSink | None, what: str, total: int | None = None, every: float = PROGRESS_EVERY_S
    ) -> None:
        self.sink, self.what, self.total, self.every = sink, what, total, every
        self.done = 0
        self._sent: tuple[int, int | None] | None = None
        self._at = -math.inf
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def update(self, done: int, total: int | None = None) -> None:
        self.done = int(done)
        self.total = self.total if total is None else int(total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)
        if time.monotonic() - self._at >= self.every:
            self._emit()

    def _emit(self) -> None:
        self._at = time.monotonic()
        if self.sink is not None and self._sent != (self.done, self.total):
            self._sent = (self.done, self.total)
            self.sink.progress(self.what, self.done, self.total)

    def __exit__(self, *exc: object) -> None:
        self._emit()
        if self._bar is not None:
            self._bar.stop()


def open_sink(out_dir: str | Path) -> JsonlSink:
    """The sink a verb writing into ``out_dir`` should use (``$CRYSTALLM_EVENTS`` wins)."""
    path = os.environ.get(ENV_VAR) or str(Path(out_dir) / FILENAME)
    return JsonlSink(path)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of a file (a torn last line is skipped)."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                out.append(json.loads(line))
    return out
