"""Run one stage attempt as subprocesses, streaming what it says; shared by the node agent and ``infra-train``.

Paths follow the experiment record (``crystallm_core/layout.py``): each step runs in ``work/<stage>/``, in
its own process group (``start_new_session``), with ``CUDA_VISIBLE_DEVICES`` set to exactly the assigned GPU
indices (empty: no GPU), ``CRYSTALLM_EVENTS`` pointing at ``metrics/<stage>.jsonl`` and ``INFRA_WKDIR`` at the
workdir (so ``crystallm`` finds the workdir's plugins). Cancel sends SIGTERM to the whole group (and to the
step's processes that left it), then SIGKILL after a short grace; a cancelled attempt ends ``cancelled``
whatever the step's exit status; when a step ends, whatever it left in its group is killed. The node's own
stops (:meth:`StageRun.stop`: the agent stopping, the disk watchdog) end it ``failed`` with a failure class.

Output is read in bounded pieces (:class:`Tail`), each byte scanned once, so a stage printing as fast as it
can neither stall nor bloat the agent; once told to stop, at most ``CANCEL_READ`` more bytes of each
output file are read.

A step's stdout and stderr go to files, not pipes, and the step is started by ``node/launch.py``, which writes
its exit status to a file: so a step outlives its agent. Everything about an attempt lives in
``work/<stage>/.infra/attempt-<n>/``: ``step-<i>.out``/``.err``, ``exit-<i>``, ``exit-<i>.started`` (written
by the launcher before the step starts) and ``run.json`` (the running step's pid, process start time and
identity, boot id and start ticks, so that a reused pid is never taken for the step, whatever the clock does).
The runner turns the files into events (log lines, also appended to ``logs/<stage>.log``, and
metric/artifact/progress lines tailed from the metrics file) from a single thread; before each event it
updates :attr:`StageRun.position` (the step and the offsets just after that event). A restarted agent passes
the last position it recorded to ``resume_from`` and the run continues exactly there: it adopts the step if
its process still runs, reads its exit status if it ended, then goes on with the next steps. No output is read
twice or skipped, and the log file is cut back to the recorded offset first, so it holds every line once too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from crystallm_core.layout import WORK, ExperimentLayout, check_stage_name, write_env_json, write_plan_json
from infra.spec.stages import Command, Rendezvous, StageContext

RECORDS = ".infra"
MAX_LINE = 8192  # longer log lines are cut (a progress bar without newlines must not exhaust the master)
MAX_CHUNK = 4 * MAX_LINE  # a "line" without a newline this long is taken as it is
EVENT_LINE_LIMIT = 1 << 20  # an events.jsonl line longer than this is unreadable, not a reason to wait
READ_SIZE = 256 << 10  # a file is read in pieces this big: a flood of output never sits in memory whole
DRAIN_BYTES = 2 << 20  # read at most this much of each file before looking at cancel and the watchdog again
CANCEL_READ = 1 << 20  # after a cancel, at most this much more of each output file is read
TERM_GRACE_S = 3.0
POLL_S = 0.2
LAUNCH = str(Path(__file__).resolve().with_name("launch.py"))
Emit = Callable[[str, dict[str, Any]], None]  # (type, body): log | metric | artifact | progress
Watchdog = Callable[[], str | None]  # a reason to stop the attempt now (e.g. the disk is full), or None
_RECORD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Result:
    state: str  # succeeded | failed | cancelled
    exit_code: int
    message: str = ""
    failure: str = ""  # failed/cancelled: cancelled | error | infra | preempted | node_lost (FailureClass)


def artifact_path(path: str, base: Path, experiment_dir: Path, workdir: Path) -> str:
    """``path`` (relative to ``base``, or absolute) as a path relative to ``workdir``, after resolving symlinks
    and ``..``. Only files of the experiment record are accepted: inside ``experiment_dir`` and not in its
    scratch folder ``work/``, so that what the master lists is what the record holds."""
    p = Path(path)
    resolved = (p if p.is_absolute() else base / p).resolve()
    root = experiment_dir.resolve()
    try:
        inside = resolved.relative_to(root)
    except ValueError:
        raise ValueError(f"artifact path {path!r} is outside the experiment directory") from None
    if inside.parts[:1] == (WORK,):
        raise ValueError(f"artifact path {path!r} is in {WORK}/, the stage's scratch folder, not in the record")
    return resolved.relative_to(workdir.resolve()).as_posix()


def aside(path: Path, n: int, suffix: str = "") -> Path:
    """Where an earlier attempt's ``path`` is kept: ``.attempt-<n>`` added to its name (before ``suffix``)."""
    return path.with_name(f"{path.name.removesuffix(suffix)}.attempt-{n}{suffix}")


def member_paths(layout: ExperimentLayout, stage: str, member: int) -> tuple[Path, Path, Path]:
    """(work dir, log file, events file) of one member of a stage. Member 0 (every stage that is no gang) has
    the layout's own; member ``r`` > 0 of a gang, which shares the experiment directory with the others,
    has ``work/<stage>@<r>/``, ``logs/<stage>@<r>.log`` and ``metrics/<stage>@<r>.jsonl`` (``@`` is in no
    stage name, so these never collide with another stage's), so that no two members write one file."""
    work, log, events = layout.work_dir(stage), layout.log_file(stage), layout.metrics_file(stage)
    if member == 0:
        return work, log, events
    tag = f"{stage}@{member}"
    return work.with_name(tag), log.with_name(f"{tag}.log"), events.with_name(f"{tag}.jsonl")


def stage_context(
    experiment_dir: Path,
    stage: str,
    smoke: bool = False,
    attempt: int = 1,
    processes: int = 1,
    rendezvous: Rendezvous | None = None,
) -> StageContext:
    """What a stage kind's builder receives: the stage's paths, as the experiment layout places them (a gang
    member's own work dir: :func:`member_paths`), its processes on this node (``processes``:
    :func:`infra.spec.stages.world_size` of its resources) and, for a gang member, the rendezvous."""
    lay = ExperimentLayout(experiment_dir)
    return StageContext(
        experiment_dir=lay.root,
        stage=stage,
        work_dir=member_paths(lay, stage, rendezvous.node_rank if rendezvous else 0)[0],
        data_dir=lay.data_dir,
        ckpts_dir=lay.ckpts_dir,
        probes_dir=lay.probes_dir,
        samples_dir=lay.samples_dir(stage),
        artifacts_dir=lay.artifacts_dir / check_stage_name(stage),
        smoke=smoke,
        attempt=attempt,
        processes=processes,
        rendezvous=rendezvous,
    )


def start_record(experiment_dir: Path, plan: dict[str, Any] | None) -> ExperimentLayout:
    """Give an experiment its standard folders and, the first time a stage of it starts on this machine,
    ``plan.json`` and ``env.json`` (never rewritten: they describe the run as it began). Independent stages
    of one experiment may start together: one thread at a time writes."""
    layout = ExperimentLayout(experiment_dir).ensure()
    with _RECORD_LOCK:
        if plan is not None and not layout.plan_json.exists():
            write_plan_json(layout, plan)
        if not layout.env_json.exists():
            write_env_json(layout)
    return layout


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def process_start(pid: int) -> float | None:
    """The process's start time, or None when no such process runs (a zombie has ended)."""
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


BOOT_ID = _boot_id()


def process_ident(pid: int) -> str | None:
    """``<boot id>:<start time in clock ticks since boot>`` of a live process, from ``/proc`` (None: no such
    process, a zombie, or no ``/proc``). Unlike the wall-clock start time (boot time read from the clock
    *now* plus ticks), it never changes when the clock is stepped (NTP, a VM resumed), so a step is still
    recognised as itself after one; and no process of another boot can match it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else f"{BOOT_ID}:{fields[19]}"


def same_process(pid: int, started: float, ident: str | None = None) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a later one reusing the pid).
    With ``ident`` (:func:`process_ident`, recorded at launch) the comparison ignores clock steps."""
    if ident and BOOT_ID:
        return process_ident(pid) == ident
    now = process_start(pid)
    return now is not None and abs(now - started) < 0.05


def _descendants(pid: int, started: float, ident: str | None) -> list[psutil.Process]:
    """The processes below the step's launcher, also those that left its process group (``setsid``)."""
    try:
        return psutil.Process(pid).children(recursive=True) if same_process(pid, started, ident) else []
    except psutil.Error:
        return []


def _signal_all(procs: Sequence[psutil.Process], pgid: int, sig: int) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) != pgid:  # the group's members get the group's signal
                p.send_signal(sig)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _group_members(pgid: int, since: float, ident: str | None = None) -> bool:
    """Whether any process of group ``pgid`` started at or after ``since`` (the group's leader may be gone)."""
    if ident and BOOT_ID:  # since the leader's start, in ticks since this boot (immune to clock steps)
        boot, ticks = ident.rsplit(":", 1)
        if boot != BOOT_ID:
            return False  # another boot: nothing of that group runs any more
        for p in psutil.process_iter():
            with contextlib.suppress(ProcessLookupError, psutil.Error, ValueError):
                mine = process_ident(p.pid)
                if os.getpgid(p.pid) == pgid and mine is not None and int(mine.rsplit(":", 1)[1]) >= int(ticks):
                    return True
        return False
    for p in psutil.process_iter(["create_time"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(p.pid) == pgid and p.info["create_time"] >= since - 0.05:
                return True
    return False


class Tail:
    """Reads a growing file from an offset; yields complete lines with the offset just after each.

    Linear and bounded: each call reads at most ``read_size`` bytes and scans them once (no re-slicing of
    what is left), and what it keeps between calls is only the start of an unfinished line, shorter than
    ``max_chunk`` (a longer "line" is cut at ``max_chunk``). A caller that is behind calls again."""

    def __init__(self, path: Path, offset: int, max_chunk: int = MAX_CHUNK, read_size: int = READ_SIZE) -> None:
        self.path, self.offset, self.max_chunk = path, offset, max_chunk
        self.read_size = max(read_size, max_chunk)
        self._buf = b""
        self.more = False  # the last call stopped at read_size: there may be more to read now

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def lines(self, final: bool = False) -> list[tuple[bytes, int]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset + len(self._buf))
                chunk = fh.read(self.read_size)
        except FileNotFoundError:
            return []
        self.more = len(chunk) == self.read_size
        data = self._buf + chunk if self._buf else chunk
        final = final and not self.more  # the end of the file is not reached yet: no partial line
        out: list[tuple[bytes, int]] = []
        pos, end, offset = 0, len(data), self.offset
        while pos < end:
            cut = data.find(b"\n", pos, pos + self.max_chunk + 1)
            if cut >= 0:
                line, nxt = data[pos:cut], cut + 1
            elif end - pos >= self.max_chunk or final:
                nxt = min(end, pos + self.max_chunk)
                line = data[pos:nxt]
            else:
                break
            offset += nxt - pos
            pos = nxt
            out.append((line, offset))
        self._buf = data[pos:]
        self.offset = offset
        return out


class StageRun:
    """One attempt: ``run()`` blocks until it ends; ``cancel()`` may be called from any thread."""

    def __init__(
        self,
        command: Command,
        experiment_dir: Path,
        stage: str,
        workdir: Path,
        gpus: Sequence[int],
        emit: Emit,
        attempt: int = 1,
        env: dict[str, str] | None = None,
        resume_from: dict[str, int] | None = None,
        watchdog: Watchdog | None = None,
        member: int = 0,
    ) -> None:
        self.command, self.workdir, self.emit = command, workdir, emit
        self.layout = ExperimentLayout(experiment_dir)
        self.member = member  # a gang's member > 0 keeps to its own files (member_paths), never the outputs
        self.work_dir, self.log_file, self.events_file = member_paths(self.layout, stage, member)
        self.gpus = list(gpus)
        self.attempt = attempt
        self.extra_env = env or {}
        self.watchdog = watchdog
        self.records = self.work_dir / RECORDS / f"attempt-{attempt}"
        # step: the step being read (1-based; 0 before the first); out/err: offsets in its output files;
        # events: the offset in the metrics file; log: the size of logs/<stage>.log
        self.position: dict[str, int] = dict(resume_from) if resume_from else {}
        self._cancelled = threading.Event()  # a user's cancel: the attempt ends cancelled
        self._halted = threading.Event()  # told to stop, by a cancel or by stop()
        self._stop_reason: str | None = None  # why the node stopped it (stop()): the attempt ends failed
        self._stop_class = ""
        self._failure = ""  # what the last step's end says about the failure class (infra, node_lost)
        self._lock = threading.Lock()
        self._pgid: int | None = None  # the running step's process group (its launcher's pid)
        self._started = 0.0
        self._ident: str | None = None
        self._log_fd: int | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def halted(self) -> bool:
        return self._halted.is_set()

    def cancel(self) -> None:
        """A user's cancel: SIGTERM the running step's process group, SIGKILL it after the grace period; the
        attempt ends ``cancelled`` whatever the step's exit status (also 0), and output not yet read by then
        is skipped (at most CANCEL_READ more bytes of each file are read)."""
        self._cancelled.set()
        self._halted.set()
        self._signal_step()

    def stop(self, reason: str, failure: str, grace: float | None = None) -> None:
        """The node stops the attempt (e.g. the agent is shutting down: ``preempted``; the disk is full:
        ``infra``): like a cancel, but the attempt ends ``failed`` with ``reason`` and that class."""
        self._set_stop(reason, failure)
        self._signal_step(grace)

    def _set_stop(self, reason: str, failure: str) -> None:
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason, self._stop_class = reason, failure
        self._halted.set()

    def _signal_step(self, grace: float | None = None) -> None:
        with self._lock:
            pgid, started, ident = self._pgid, self._started, self._ident
        if pgid is None or not same_process(pgid, started, ident):
            return
        escaped = _descendants(pgid, started, ident)  # taken now: once the launcher is gone they cannot be found
        _kill_group(pgid, signal.SIGTERM)
        _signal_all(escaped, pgid, signal.SIGTERM)
        deadline = time.monotonic() + (TERM_GRACE_S if grace is None else grace)
        while time.monotonic() < deadline and same_process(pgid, started, ident):
            time.sleep(0.05)
        _kill_group(pgid, signal.SIGKILL)
        _signal_all(escaped, pgid, signal.SIGKILL)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # so CUDA's indices are NVML's
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
        env["CRYSTALLM_EVENTS"] = str(self.events_file)
        env["INFRA_WKDIR"] = str(self.workdir)  # crystallm verbs load this workdir's plugins
        env["PYTHONUNBUFFERED"] = "1"  # log lines arrive as they are printed
        return env

    def _log(self, stream: str, text: str) -> None:
        """A log line: appended to logs/<stage>.log (the agent's own lines marked), then sent."""
        if self._log_fd is not None:
            line = "\n".join(f"[infra] {x}" for x in text.split("\n")) if stream == "agent" else text
            data = line.encode("utf-8", errors="replace") + b"\n"
            try:
                os.write(self._log_fd, data)
                self.position["log"] = self.position.get("log", 0) + len(data)
            except OSError as e:
                os.close(self._log_fd)
                self._log_fd = None
                self.emit("log", {"stream": "agent", "text": f"cannot write {self.log_file}: {e}; it ends here"})
        self.emit("log", {"stream": stream, "text": text})

    def _agent(self, text: str) -> None:
        self._log("agent", text)

    def _open_log(self) -> None:
        """Append to the stage's log from the recorded offset (what a crashed agent wrote past it is cut)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        offset = self.position.setdefault("log", size)
        if size > offset:
            os.ftruncate(fd, offset)
        self.position["log"] = min(offset, size)
        self._log_fd = fd

    def _set_aside(self) -> list[str]:
        """A retry that must start clean keeps what the earlier attempt left (its work dir, log, metrics file
        and declared outputs), each renamed with ``.attempt-<n>``, n the first number free for all of them."""
        found = [
            (path, suffix)
            for path, suffix in [
                (self.work_dir, ""),
                (self.log_file, ".log"),
                (self.events_file, ".jsonl"),
                *((self.layout.root / out, "") for out in (self.command.outputs if not self.member else ())),
            ]
            if path.exists() or path.is_symlink()
        ]
        n = self.attempt - 1
        while any(aside(path, n, suffix).exists() for path, suffix in found):
            n += 1
        for path, suffix in found:
            path.rename(aside(path, n, suffix))
        return [self.layout.relative(aside(path, n, suffix)) for path, suffix in found]

    def run(self) -> Result:
        kept: list[str] = []
        try:
            if not self.position:
                if self.halted:
                    return self._halt_result(-signal.SIGTERM, "before it started")
                kept = self._prepare_dir()
                self.position = {"step": 0, "out": 0, "err": 0, "events": self._events_size()}
            self.records.mkdir(parents=True, exist_ok=True)
            self._open_log()
        except OSError as e:  # e.g. the work directory cannot be created: the node's fault, not the stage's
            return Result("failed", -1, f"cannot prepare the stage's directories: {e}", "infra")
        try:
            if kept:
                self._agent(f"earlier attempt's files kept as {', '.join(kept)}")
            return self._run_steps()
        finally:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None

    def _run_steps(self) -> Result:
        events = Tail(self.events_file, self.position["events"], max_chunk=EVENT_LINE_LIMIT)
        n = len(self.command.steps)
        first = max(1, self.position["step"])
        for i in range(first, n + 1):
            argv = self.command.steps[i - 1]
            self._failure = ""
            code = self._step(i, argv, events)  # a step that may still run is adopted (and stopped) even now
            if code is None:
                return self._halt_result(-signal.SIGTERM, "before it started")
            if self.halted:  # never "succeeded" once told to stop, whatever the exit status
                return self._halt_result(code)
            if code != 0:
                what = " ".join(argv[3:5]) if argv[1:3] == ["-m", "crystallm_core.cli"] else Path(argv[0]).name
                return Result("failed", code, f"step {i}/{n} ({what}) exited with {code}", self._failure or "error")
        return Result("succeeded", 0)

    def _halt_result(self, code: int, when: str = "") -> Result:
        """How an attempt that was told to stop ends: a user's cancel wins over the node's own reason."""
        if self.cancelled:
            return Result("cancelled", code, f"cancelled {when}".strip(), "cancelled")
        reason = self._stop_reason or "stopped"
        return Result("failed", code, f"{reason} ({when})" if when else reason, self._stop_class or "infra")

    def _prepare_dir(self) -> list[str]:
        kept = self._set_aside() if self.command.fresh_dir and self.attempt > 1 else []
        for folder in (self.work_dir, self.events_file.parent, self.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.command.files.items():
            target = self.work_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        return kept

    def _events_size(self) -> int:
        return self.events_file.stat().st_size if self.events_file.exists() else 0

    def _record(self) -> dict[str, Any] | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads((self.records / "run.json").read_text(encoding="utf-8"))
        return None

    def _step(self, i: int, argv: list[str], events: Tail) -> int | None:
        """Run step ``i`` (or pick it up where a previous agent left it) until it ends; its exit code, or
        None when the attempt was cancelled before the step started."""
        out, err = self.records / f"step-{i}.out", self.records / f"step-{i}.err"
        exit_file = self.records / f"exit-{i}"
        record = self._record() if self.position["step"] == i else None
        if self.position["step"] == i and (record is None or record.get("step") != i):
            record = self._launched_record(i, exit_file, argv)  # launched by an agent that died before recording it
        proc: subprocess.Popen[bytes] | None = None
        if record is None or record.get("step") != i:  # not launched yet
            if self.halted:
                return None
            if self.position["step"] != i:
                self.position.update(step=i, out=0, err=0)
                self._agent("$ " + " ".join(argv))
            try:
                proc = self._launch(argv, out, err, exit_file)
            except OSError as e:
                self._agent(f"cannot start {argv[0]}: {e}")
                self._failure = "infra"
                return 127
            record = {
                "step": i,
                "pid": proc.pid,
                "start_time": process_start(proc.pid) or time.time(),
                "ident": process_ident(proc.pid),
                "argv": argv,
            }
            tmp = self.records / "run.json.tmp"
            tmp.write_text(json.dumps(record), encoding="utf-8")
            tmp.replace(self.records / "run.json")
        elif same_process(record["pid"], record["start_time"], record.get("ident")):
            self._agent(f"adopted step {i} (pid {record['pid']}), still running after an agent restart")
        with self._lock:
            self._pgid, self._started, self._ident = record["pid"], record["start_time"], record.get("ident")
        if self.halted:
            self._signal_step()
        outs = (Tail(out, self.position["out"]), "stdout", "out"), (Tail(err, self.position["err"]), "stderr", "err")
        while self._alive(proc, record):
            more = self._drain(outs, events)  # bounded: a flood of output is read on in the next turns
            reason = self.watchdog() if self.watchdog is not None else None
            if reason is not None and self._stop_reason is None:
                self._agent(reason)
                self._set_stop(reason, "infra")
                threading.Thread(target=self._signal_step, daemon=True).start()
            if not more:
                time.sleep(POLL_S)
        pgid, started = record["pid"], record["start_time"]
        if proc is not None or _group_members(pgid, started, record.get("ident")):
            _kill_group(pgid, signal.SIGKILL)  # leftovers of the step die with it
        with self._lock:
            self._pgid = None
        while self._drain(outs, events, final=True, budget=CANCEL_READ if self.halted else DRAIN_BYTES):
            if self.halted:  # told to stop: what the step wrote and was not read by now is skipped
                skipped = sum(max(0, _size(t.path) - t.offset) for t, _, _ in outs)
                self._agent(f"{skipped} bytes of the step's output not read: the attempt was told to stop")
                break
        return self._exit_code(exit_file, proc, i)

    def _launched_record(self, i: int, exit_file: Path, argv: list[str]) -> dict[str, Any] | None:
        """The record of step ``i`` from what its launcher wrote at its start (``exit-<i>.started``), if it
        was started; it becomes ``run.json``."""
        try:
            started = json.loads(exit_file.with_name(exit_file.name + ".started").read_text(encoding="utf-8"))
            pid = int(started["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        ident = started.get("ident")
        live = same_process(pid, 0.0, ident) if ident else False
        record = {"step": i, "pid": pid, "start_time": (process_start(pid) if live else None) or 0.0, "ident": ident}
        record["argv"] = argv
        tmp = self.records / "run.json.tmp"
        tmp.write_text(json.dumps(record), encoding="utf-8")
        tmp.replace(self.records / "run.json")
        return record

    def _launch(self, argv: list[str], out: Path, err: Path, exit_file: Path) -> subprocess.Popen[bytes]:
        with open(out, "ab") as fo, open(err, "ab") as fe:
            return subprocess.Popen(
                [sys.executable, "-S", LAUNCH, str(exit_file), "--", *argv],
                cwd=self.work_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
                start_new_session=True,
            )

    @staticmethod
    def _alive(proc: subprocess.Popen[bytes] | None, record: dict[str, Any]) -> bool:
        if proc is not None:
            return proc.poll() is None
        return same_process(record["pid"], record["start_time"], record.get("ident"))

    def _exit_code(self, exit_file: Path, proc: subprocess.Popen[bytes] | None, i: int) -> int:
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            words = exit_file.read_text(encoding="utf-8").split()
            if words[1:2] == ["launch-failed"]:  # the launcher could not start the command (not found, ...)
                self._failure = "infra"
            return int(words[0])
        if proc is not None and proc.returncode not in (None, 0):
            return proc.returncode  # the launcher itself was killed
        if proc is None and not self.halted:  # an adopted step that vanished: its node lost it
            self._failure = "node_lost"
        self._agent(f"step {i} left no exit status (killed together with its launcher, or the machine restarted)")
        return -signal.SIGKILL

    def _drain(
        self, outs: Sequence[tuple[Tail, str, str]], events: Tail, final: bool = False, budget: int = DRAIN_BYTES
    ) -> bool:
        """Turn up to ``budget`` bytes of each file into events; whether some file has more to read now."""
        more = False
        for tail, stream, key in outs:
            start = tail.offset
            while True:
                for raw, offset in tail.lines(final):
                    text = raw.decode("utf-8", errors="replace").rstrip("\r")
                    if len(text) > MAX_LINE:
                        text = text[:MAX_LINE] + f" ... [{len(text) - MAX_LINE} characters cut]"
                    self.position[key] = offset
                    self._log(stream, text)
                if not tail.more or tail.offset - start >= budget or (self.halted and not final):
                    break  # told to stop: the step is being signalled; what is left is read after it ends
            more = more or tail.more
        start = events.offset
        while True:
            for raw, offset in events.lines():
                self.position["events"] = offset
                if raw.strip():
                    self._event(raw)
            if not events.more or events.offset - start >= budget or (self.halted and not final):
                break
        return more or events.more

    def _event(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            kind = ev["type"]
        except (ValueError, KeyError, TypeError):
            self._agent(f"{self.events_file.name}: unreadable line {line[:200]!r}")
            return
        if kind == "metric":
            self.emit("metric", {"step": int(ev.get("step", 0)), "values": dict(ev.get("values") or {})})
        elif kind == "artifact":
            try:
                rel = artifact_path(str(ev["path"]), self.events_file.parent, self.layout.root, self.workdir)
            except (ValueError, KeyError) as e:
                self._agent(f"artifact rejected: {e}")
                return
            self.emit("artifact", {"path": rel, "kind": str(ev.get("kind", ""))})
        elif kind == "progress":
            self.emit(
                "progress", {"what": str(ev.get("what", "")), "done": int(ev.get("done", 0)), "total": ev.get("total")}
            )
