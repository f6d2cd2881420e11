"""Run one stage attempt as subprocesses, streaming what it says; shared by the node agent and ``infra-train``.

Each step runs in the stage directory, in its own process group (``start_new_session``), with
``CUDA_VISIBLE_DEVICES`` set to exactly the assigned GPU indices (empty: no GPU) and
``CRYSTALLM_EVENTS`` pointing at ``<stage dir>/events.jsonl``. stdout and stderr become log events
line by line; events.jsonl is tailed into metric/artifact/progress events. Cancel sends SIGTERM to the
whole group, then SIGKILL after a short grace; when a step ends, whatever it left in its group is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from infra.stages import Command

EVENTS_FILE = "events.jsonl"
MAX_LINE = 8192  # longer log lines are cut (a progress bar without newlines must not exhaust the master)
TERM_GRACE_S = 3.0
Emit = Callable[[str, dict[str, Any]], None]  # (type, body): log | metric | artifact | progress


@dataclass(frozen=True)
class Result:
    state: str  # succeeded | failed | cancelled
    exit_code: int
    message: str = ""


def workdir_relative(path: str, base: Path, workdir: Path) -> str:
    """``path`` (relative to ``base``, or absolute) as a path relative to ``workdir``, after resolving
    symlinks and ``..``; a path that ends up outside the workdir is refused."""
    p = Path(path)
    resolved = (p if p.is_absolute() else base / p).resolve()
    try:
        return resolved.relative_to(workdir.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"artifact path {path!r} is outside the workdir") from None


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class EventsTail:
    """Follows events.jsonl from where it was when the attempt started (a retry appends to it)."""

    def __init__(self, path: Path, stage_dir: Path, workdir: Path, emit: Emit) -> None:
        self.path, self.stage_dir, self.workdir, self.emit = path, stage_dir, workdir, emit
        self.offset = path.stat().st_size if path.exists() else 0
        self._buf = b""

    def poll(self) -> None:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")  # a torn last line waits for its newline
        for line in lines:
            if line.strip():
                self._one(line)

    def _one(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            kind = ev["type"]
        except (ValueError, KeyError, TypeError):
            self.emit("log", {"stream": "agent", "text": f"events.jsonl: unreadable line {line[:200]!r}"})
            return
        if kind == "metric":
            self.emit("metric", {"step": int(ev.get("step", 0)), "values": dict(ev.get("values") or {})})
        elif kind == "artifact":
            try:
                rel = workdir_relative(str(ev["path"]), self.path.parent, self.workdir)
            except (ValueError, KeyError) as e:
                self.emit("log", {"stream": "agent", "text": f"artifact rejected: {e}"})
                return
            self.emit("artifact", {"path": rel, "kind": str(ev.get("kind", ""))})
        elif kind == "progress":
            self.emit(
                "progress", {"what": str(ev.get("what", "")), "done": int(ev.get("done", 0)), "total": ev.get("total")}
            )


class StageRun:
    """One attempt: ``run()`` blocks until it ends; ``cancel()`` may be called from any thread."""

    def __init__(
        self,
        command: Command,
        stage_dir: Path,
        workdir: Path,
        gpus: Sequence[int],
        emit: Emit,
        attempt: int = 1,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command, self.stage_dir, self.workdir, self.emit = command, stage_dir, workdir, emit
        self.gpus = list(gpus)
        self.attempt = attempt
        self.extra_env = env or {}
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """SIGTERM the running step's process group, SIGKILL it after the grace period."""
        self._cancelled.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(TERM_GRACE_S)
        _kill_group(proc.pid, signal.SIGKILL)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so CUDA's indices are NVML's
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        env["CRYSTALLM_EVENTS"] = str(self.stage_dir / EVENTS_FILE)
        env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they are printed
        return env

    def _set_aside(self) -> None:
        """A retry that must start clean keeps the earlier attempt's directory as ``<stage>.attempt-<n>``."""
        n = self.attempt - 1
        target = self.stage_dir.with_name(f"{self.stage_dir.name}.attempt-{n}")
        while target.exists():
            n += 1
            target = self.stage_dir.with_name(f"{self.stage_dir.name}.attempt-{n}")
        self.stage_dir.rename(target)
        self.emit("log", {"stream": "agent", "text": f"earlier attempt's directory kept as {target.name}"})

    def run(self) -> Result:
        if self.command.fresh_dir and self.attempt > 1 and self.stage_dir.exists():
            self._set_aside()
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.command.files.items():
            target = self.stage_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        tail = EventsTail(self.stage_dir / EVENTS_FILE, self.stage_dir, self.workdir, self.emit)
        env = self._env()
        n = len(self.command.steps)
        for i, argv in enumerate(self.command.steps, 1):
            if self.cancelled:
                return Result("cancelled", -signal.SIGTERM, "cancelled before it started")
            code = self._step(argv, env, tail)
            if self.cancelled:
                return Result("cancelled", code, "cancelled")
            if code != 0:
                what = " ".join(argv[3:5]) if argv[1:3] == ["-m", "crystallm_core.cli"] else Path(argv[0]).name
                return Result("failed", code, f"step {i}/{n} ({what}) exited with {code}")
        return Result("succeeded", 0)

    def _step(self, argv: list[str], env: dict[str, str], tail: EventsTail) -> int:
        self.emit("log", {"stream": "agent", "text": "$ " + " ".join(argv)})
        try:
            with self._lock:
                if self.cancelled:
                    return -signal.SIGTERM
                proc = subprocess.Popen(
                    argv,
                    cwd=self.stage_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
                self._proc = proc
        except OSError as e:
            self.emit("log", {"stream": "agent", "text": f"cannot start {argv[0]}: {e}"})
            return 127
        readers = [
            threading.Thread(target=self._pump, args=(pipe, name), daemon=True)
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
        ]
        for t in readers:
            t.start()
        while proc.poll() is None:
            tail.poll()
            time.sleep(0.2)
        _kill_group(proc.pid, signal.SIGKILL)  # leftovers of the step die with it, and release the pipes
        for t in readers:
            t.join(5)
        tail.poll()
        return proc.returncode

    def _pump(self, pipe: IO[bytes] | None, stream: str) -> None:
        assert pipe is not None
        with pipe:
            for raw in iter(lambda: pipe.readline(4 * MAX_LINE), b""):
                text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if len(text) > MAX_LINE:
                    text = text[:MAX_LINE] + f" ... [{len(text) - MAX_LINE} characters cut]"
                self.emit("log", {"stream": stream, "text": text})
