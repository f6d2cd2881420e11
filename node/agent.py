"""``infra node``: register with the master, heartbeat, take assignments, run stages, report.

Every connection is opened by the agent (a node behind NAT needs no inbound port): unary calls for
registration, events and status, one long-lived stream for heartbeats (each message acknowledged) and one
long-lived server stream for commands. Threads: heartbeat (and the reader of its acknowledgements),
command stream, sender, and one per running stage attempt.

What must survive the agent lives in ``<workdir>/nodes/<name>.d/``: ``attempts/<id>.json`` (the
assignment and the commands built for it, written when it arrives) and the event spool
(``node/spool.py``). A restarted agent keeps its identity, reads these, adopts the steps whose processes
still run (``node/runner.py`` records pid and start time), and registers listing every attempt it holds;
the master cancels those it no longer wants. While the master is away the stages keep running, events
wait in the spool, and every call is retried with jittered exponential backoff.

Stopping: SIGTERM/SIGINT begins a graceful stop (no new work, heartbeats say ``stopping``, running stages
get ``--stop-deadline`` seconds, then are stopped and reported failed, class ``preempted``); a second
signal stops them at once. Every FAILED/CANCELLED report carries its failure class (docs/RELIABILITY.md).
A user's cancel is written to ``attempts/<id>.cancel``, so a restarted agent honours it too.

Leases: each report carries the attempt's lease. When the master says a lease is gone (a refused
report, ``EventAck.rejected_attempts``, ``HeartbeatResponse.revoked`` or a cancel after re-registering),
the agent kills its copy and forgets it, so a stage never has two live copies that the master listens to.

Plugins, at start: stage kinds from ``$INFRA_STAGE_MODULES`` and ``<workdir>/plugins/stage/*.py`` are
imported here, each within ``--plugin-timeout`` (one that fails or hangs becomes a warning fact); the other
plugins (scorers, vocabularies, model sizes, metrics) are listed by ``crystallm plugins list`` in a
subprocess, since they import torch, and advertised as extras ``KIND:NAME``. Each stage's experiment gets
its record (``plan.json``, ``env.json``, the standard folders) when its first stage starts here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict, ParseDict
from pydantic import ValidationError

from crystallm_core.layout import LayoutError, check_stage_name, experiment_dir
from infra.node import facts as node_facts
from infra.node.identity import node_id as load_node_id
from infra.node.identity import state_dir
from infra.node.runner import StageRun, stage_context, start_record
from infra.node.settings import Options
from infra.node.spool import Item, Spool
from infra.node.stage_plugins import load_stage_modules, workdir_stage_plugins
from infra.node.uploads import upload_messages
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc
from infra.protos.transport import KEEPALIVE, RECONNECT, Connection
from infra.spec.plan import validation_issues, with_defaults
from infra.spec.stages import Command, Rendezvous, Resources, get_stage_kind, world_size

log = logging.getLogger("infra.node")
BATCH = 1000
REFUSED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
FAILURE_CLASSES = {
    "cancelled": infra_pb2.FAILURE_CANCELLED,
    "error": infra_pb2.FAILURE_ERROR,
    "infra": infra_pb2.FAILURE_INFRA,
    "preempted": infra_pb2.FAILURE_PREEMPTED,
    "node_lost": infra_pb2.FAILURE_NODE_LOST,
}
STOP_GRACE_S = 15.0  # after the stop deadline: for the stopped stages to end and their reports to go
MAX_UPLOADS = 4  # artifact uploads at once; the master gets a clear "busy" beyond that
UPLOAD_TIMEOUT_S = 6 * 3600.0  # one upload call; the master ends it earlier when its client goes away


class FatalError(Exception):
    pass


def final_report(
    node_id: str, attempt_id: int, lease: str, final: dict[str, Any], last_seq: int
) -> infra_pb2.StageStatusReport:
    """The final status report of an attempt; every FAILED or CANCELLED one carries its failure class (a
    final recorded by an older agent has none: cancelled for a cancel, error otherwise)."""
    state = final["state"]
    rep = infra_pb2.StageStatusReport(
        node_id=node_id,
        attempt_id=attempt_id,
        lease_token=lease,
        state=infra_pb2.StageState.Value(state.upper()),
        exit_code=final["exit_code"],
        message=final["message"],
        last_seq=last_seq,
    )
    if state in ("failed", "cancelled"):
        failure = final.get("failure") or ("cancelled" if state == "cancelled" else "error")
        rep.failure_class = FAILURE_CLASSES.get(failure, infra_pb2.FAILURE_ERROR)
    return rep


def _event(it: Item) -> infra_pb2.Event:
    ev = infra_pb2.Event(attempt_id=it.attempt, lease_token=it.lease, seq=it.seq, time=it.time)
    body = it.body
    if it.type == "metric":
        ev.metric.step = int(body.get("step", 0))
        for k, v in body.get("values", {}).items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                f = math.nan
            if math.isfinite(f):
                ev.metric.values[k] = f
            else:
                ev.metric.null_values.append(k)
    elif it.type == "artifact":
        ev.artifact.path, ev.artifact.kind = body["path"], body["kind"]
    elif it.type == "progress":
        ev.progress.what, ev.progress.done = body["what"], body["done"]
        if body.get("total") is not None:
            ev.progress.total, ev.progress.has_total = int(body["total"]), True
    elif it.type == "dropped":
        ParseDict(body, ev.dropped)
    else:
        ev.log.stream, ev.log.text = body.get("stream", ""), body.get("text", "")
    return ev


def _jittered(delay: float) -> tuple[float, float]:
    """A pause around ``delay`` (so that many nodes do not reconnect in step) and the next, longer delay."""
    return delay * random.uniform(0.5, 1.5), min(delay * 2, 5.0)


def _reason(e: Exception) -> str:
    if isinstance(e, grpc.RpcError):
        return str(e.details() or e.code())
    return str(e)


class Beats:
    """The node's open HeartbeatStream call: one heartbeat at a time, each waiting for its acknowledgement.

    gRPC's blocking API reads a stream without a time limit, so a reader thread hands the acknowledgements
    over and :meth:`send` waits at most ``timeout`` for its own, as the unary call's deadline did; a stalled
    stream is then given up (:meth:`close`) rather than waited on."""

    def __init__(self, stub: infra_pb2_grpc.NodeServiceStub) -> None:
        self._out: queue.SimpleQueue[infra_pb2.HeartbeatRequest | None] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[infra_pb2.HeartbeatResponse | Exception] = queue.SimpleQueue()
        self._call = stub.HeartbeatStream(iter(self._out.get, None))
        self._seq = 0
        threading.Thread(target=self._read, name="heartbeat-acks", daemon=True).start()

    def _read(self) -> None:
        try:
            for ack in self._call:
                self._acks.put(ack)
            self._acks.put(ConnectionError("the master ended the heartbeat stream"))
        except grpc.RpcError as e:
            self._acks.put(e)

    def send(self, req: infra_pb2.HeartbeatRequest, timeout: float) -> infra_pb2.HeartbeatResponse:
        """Send ``req`` and return its acknowledgement; raises grpc.RpcError when the stream failed, OSError
        (TimeoutError, ConnectionError) when no acknowledgement came in time or the stream ended."""
        self._seq += 1
        req.seq = self._seq
        self._out.put(req)
        try:
            ack = self._acks.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"heartbeat {req.seq} not acknowledged within {timeout:g}s") from None
        if isinstance(ack, Exception):
            raise ack
        if ack.seq != req.seq:
            raise ConnectionError(f"the master acknowledged heartbeat {ack.seq}, not {req.seq}")
        return ack

    def close(self) -> None:
        self._out.put(None)  # ends the requests (a half-close), then the call itself
        self._call.cancel()


@dataclass(eq=False)
class Held:
    """An attempt this node holds: running, or ended with its final report still on the way."""

    assignment: infra_pb2.Assignment
    run: StageRun | None = None
    stale: bool = False  # the master no longer wants it: stop it, forget it
    active: bool = False  # a thread is preparing or running it


@dataclass
class DiskGuard:
    """Free space of the workdir, read at most once a second (every running stage asks)."""

    workdir: Path
    min_free_mib: int
    stop_free_mib: int
    _at: float = 0.0
    _free: int = field(default=1 << 40)

    def free(self) -> int:
        now = time.monotonic()
        if now - self._at >= 1.0:
            self._at, self._free = now, node_facts.disk_free_mib(self.workdir)
        return self._free

    def unavailable(self) -> str:
        free = self.free()
        if free < self.min_free_mib:
            return (
                f"workdir {self.workdir} has {free} MiB free, below the {self.min_free_mib} MiB minimum "
                "(--min-free-disk): no new stages"
            )
        return ""

    def stop_reason(self) -> str | None:
        free = self.free()
        if free < self.stop_free_mib:
            return (
                f"stopped: the workdir's disk is nearly full ({free} MiB free, below {self.stop_free_mib} MiB, "
                "--stop-free-disk)"
            )
        return None


class Agent:
    def __init__(self, opts: Options, warnings: list[str] | None = None, plugin_extras: Sequence[str] = ()) -> None:
        self.opts = opts
        self.workdir = opts.workdir
        self.node_id = load_node_id(self.workdir, opts.name)
        self.state = state_dir(self.workdir, opts.name)
        self.attempts_dir = self.state / "attempts"
        self.attempts_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(self.state / "spool", opts.spool_limit_mib << 20)
        stop_free = opts.stop_free_disk_mib if opts.stop_free_disk_mib is not None else opts.min_free_disk_mib // 2
        self.disk = DiskGuard(self.workdir, opts.min_free_disk_mib, stop_free)
        self.gpus = node_facts.probe_gpus(opts.fake_gpus)
        self.facts = node_facts.collect_facts(self.workdir, opts.name, self.gpus, opts.cpus, opts.memory_mib)
        self.facts["warnings"] = list(warnings or [])
        self.facts["extras"] = sorted({*self.facts["extras"], *plugin_extras})  # e.g. scorer:NAME
        address = opts.advertise_address
        self.facts["advertise_address"] = node_facts.route_address(opts.master) if address is None else address
        self.conn = Connection(opts.master, opts.token, opts.tls, KEEPALIVE + RECONNECT)
        self.stub = infra_pb2_grpc.NodeServiceStub(self.conn.channel)
        self.stop = threading.Event()  # the loops end (after the graceful stop, or at once when fatal)
        self.stopping = threading.Event()  # a graceful stop began: no new work, stages get the deadline
        self.stop_now = threading.Event()  # a second signal: stop the stages now
        self._wake = threading.Event()  # run() waits on this: a signal or a fatal error
        self._beat_now = threading.Event()  # send a heartbeat at once (e.g. to say that the node stops)
        self._preempt: str | None = None  # set at the stop deadline: every attempt is stopped with this
        self._serving = False  # registered and running its loops (before that a signal just ends the agent)
        self.session: int | None = None
        self.interval = opts.heartbeat
        self._reg_lock = threading.Lock()
        self._lock = threading.Lock()
        self.held: dict[int, Held] = {}
        self.cancelled: set[int] = set()  # cancels that arrived before (or without) their assignment
        self._stream: Any = None
        self._uploads = threading.BoundedSemaphore(MAX_UPLOADS)
        self.fatal: str | None = None

    # --- restart -------------------------------------------------------------------------------

    def recover(self) -> int:
        """Pick up the attempts an earlier agent process left: running, ended but unreported, or never
        started. Returns how many."""
        for path in sorted(self.attempts_dir.glob("*.json")):
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                a = ParseDict(saved["assignment"], infra_pb2.Assignment())
            except (ValueError, KeyError) as e:
                log.error("%s is damaged (%s); ignoring that attempt", path, e)
                path.unlink()
                continue
            rec = self.spool.open(a.attempt_id, a.lease_token)
            if self._cancel_marker(a.attempt_id).exists():  # a cancel the previous agent process received
                self.cancelled.add(a.attempt_id)
            self.held[a.attempt_id] = Held(a, active=rec.final is None)
            if rec.final is None:
                command = Command(**saved["command"]) if "command" in saved else None
                self._start(a, command, rec.position)
            log.info(
                "recovered attempt %s (%s/%s): %s",
                a.attempt_id,
                a.experiment,
                a.stage,
                "ended, report pending" if rec.final else "resuming" if rec.position else "not started yet",
            )
        for attempt_id in self.spool.on_disk():
            if attempt_id not in self.held:
                self.spool.remove_file(attempt_id)
        for marker in self.attempts_dir.glob("*.cancel"):
            if not marker.stem.isdigit() or int(marker.stem) not in self.held:
                marker.unlink()
        return len(self.held)

    def _save(self, a: infra_pb2.Assignment, command: Command | None = None) -> None:
        data: dict[str, Any] = {"assignment": MessageToDict(a, preserving_proto_field_name=True)}
        if command is not None:
            data["command"] = {
                "steps": command.steps,
                "files": command.files,
                "fresh_dir": command.fresh_dir,
                "outputs": command.outputs,
            }
        path = self.attempts_dir / f"{a.attempt_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(path)

    def _cancel_marker(self, attempt_id: int) -> Path:
        return self.attempts_dir / f"{attempt_id}.cancel"

    def _forget(self, attempt_id: int) -> None:
        """Done with an attempt (the master has its final report, or no longer wants it)."""
        with contextlib.suppress(FileNotFoundError):
            (self.attempts_dir / f"{attempt_id}.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            self._cancel_marker(attempt_id).unlink()
        self.spool.discard(attempt_id)
        with self._lock:
            self.held.pop(attempt_id, None)

    # --- registration --------------------------------------------------------------------------

    def _held_attempts(self) -> list[infra_pb2.RunningAttempt]:
        with self._lock:
            return [
                infra_pb2.RunningAttempt(attempt_id=h.assignment.attempt_id, lease_token=h.assignment.lease_token)
                for h in self.held.values()
                if not h.stale
            ]

    def ensure_registered(self) -> int:
        with self._reg_lock:
            if self.session is not None:
                return self.session
            req = infra_pb2.RegisterRequest(
                protocol_version=PROTOCOL_VERSION, node_id=self.node_id, running=self._held_attempts()
            )
            ParseDict(self.facts, req.facts)
            try:
                resp = self.stub.Register(req, timeout=10)
            except grpc.RpcError as e:
                if e.code() in REFUSED or e.code() in DENIED:
                    raise FatalError(f"the master refused this node: {e.details()}") from None
                raise
            self.session = resp.session
            if resp.heartbeat_interval_s > 0:
                self.interval = min(self.opts.heartbeat, resp.heartbeat_interval_s)
            log.info("registered with %s as %s (%s)", self.opts.master, self.opts.name, self.node_id)
            return resp.session

    def _forget_session(self, session: int) -> None:
        with self._reg_lock:
            if self.session == session:
                self.session = None

    def _backoff(self, delay: float) -> float:
        """Wait a jittered ``delay`` (so that many nodes do not reconnect in step); the next delay. While
        stopping (the last deliveries) the wait is a plain sleep: the stop event no longer waits."""
        pause, delay = _jittered(delay)
        if self.stop.is_set():
            time.sleep(pause)
        else:
            self.stop.wait(pause)
        return delay

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` until it works or the agent stops; a fatal refusal stops the agent."""
        delay = 0.25
        while not self.stop.is_set():
            try:
                return fn()
            except FatalError as e:
                self.fatal = str(e)
                self.stop.set()
                self._wake.set()
            except grpc.RpcError as e:
                log.warning("%s: %s; retrying", what, e.details() or e.code())
                delay = self._backoff(delay)
        return None

    # --- loops ---------------------------------------------------------------------------------

    def unavailable(self) -> str:
        """Why the node takes no new stages now ("" when it does)."""
        if self.stopping.is_set():
            return (
                "stopping: the node agent was told to stop; running stages get "
                f"{self.opts.stop_deadline:g} s to finish (--stop-deadline)"
            )
        return self.disk.unavailable()

    def heartbeat_loop(self) -> None:
        """Heartbeats as messages on one HeartbeatStream, each sent once the previous one was acknowledged
        (the master relies on that order to tell an attempt the agent dropped from a report still on its
        way). A stream that breaks or stalls is opened again after a jittered backoff, never longer than the
        interval; the master only sees the silence, and its lost timeout decides."""
        node_facts.usage(self.workdir, self.gpus)  # prime psutil's CPU counter
        beats: Beats | None = None
        delay, wait = 0.25, self.interval
        try:
            while True:
                self._beat_now.wait(wait)
                self._beat_now.clear()
                if self.stop.is_set():
                    return
                session = self._retrying("register", self.ensure_registered)
                if session is None:
                    return
                req = self._heartbeat(session)
                try:
                    beats = beats or Beats(self.stub)
                    resp = beats.send(req, timeout=max(2.0, self.interval))
                except (grpc.RpcError, OSError) as e:  # OSError: no acknowledgement in time, or the stream ended
                    log.warning("heartbeat stream: %s; reconnecting", _reason(e))
                    if beats is not None:
                        beats.close()
                    beats = None
                    pause, delay = _jittered(delay)
                    wait = min(pause, self.interval)
                    continue
                delay, wait = 0.25, self.interval
                if resp.reregister:
                    self._forget_session(session)
                for attempt_id in resp.revoked:
                    self._revoke(attempt_id, "its lease is gone (the master gave it to another node)")
        finally:
            if beats is not None:
                beats.close()

    def _heartbeat(self, session: int) -> infra_pb2.HeartbeatRequest:
        req = infra_pb2.HeartbeatRequest(node_id=self.node_id, session=session, running=self._held_attempts())
        try:
            ParseDict(node_facts.usage(self.workdir, self.gpus), req.usage)
            req.unavailable = self.unavailable()
        except Exception as e:  # a usage probe that fails must not stop the heartbeats (the node would be lost)
            log.warning("could not read usage: %s", e)
        return req

    def stream_loop(self) -> None:
        delay = 0.25
        while not self.stop.is_set():
            session = self._retrying("register", self.ensure_registered)
            if session is None:
                return
            try:
                self._stream = self.stub.Assignments(
                    infra_pb2.AssignmentStreamRequest(node_id=self.node_id, session=session)
                )
                for command in self._stream:
                    delay = 0.25
                    try:
                        self._handle(command)
                    except Exception:  # e.g. the workdir's disk is full: keep the stream
                        log.exception("handling %s", command.WhichOneof("command"))
                log.info("the master closed the command stream; reconnecting")
            except grpc.RpcError as e:
                if self.stop.is_set():
                    return
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self._forget_session(session)
                log.warning("command stream: %s; reconnecting", e.details() or e.code())
            delay = self._backoff(delay)

    def send_loop(self) -> None:
        """Deliver spooled events in order, then each ended attempt's final report; runs until the agent
        stops and (for a short while after) until the spool is empty."""
        delay, synced, drain_until = 0.25, time.monotonic(), None
        while True:
            if self.stop.is_set():
                drain_until = drain_until or time.monotonic() + 10
                if self.spool.idle() or time.monotonic() > drain_until:
                    return
            try:
                self._send_events()
                self._send_finals()
                delay = 0.25
            except grpc.RpcError as e:
                log.warning("reporting to the master failed: %s; retrying", e.details() or e.code())
                delay = self._backoff(delay)
            except Exception:  # the sender must outlive a bug or a full disk: everything waits on it
                log.exception("sender")
                delay = self._backoff(delay)
            if time.monotonic() - synced > 1.0:
                self.spool.sync()
                synced = time.monotonic()

    def _send_events(self) -> None:
        items = self.spool.take(BATCH, 0.2)
        if not items:
            return
        batch = infra_pb2.EventBatch(node_id=self.node_id, events=[_event(it) for it in items])
        try:
            ack = self.stub.ReportEvents(batch, timeout=30)
        except grpc.RpcError:
            self.spool.release(items)
            raise
        rejected = set(ack.rejected_attempts)
        self.spool.acked(items, rejected)
        for attempt_id in rejected:
            self._revoke(attempt_id, "the master refused its events (stale lease)")

    def _send_finals(self) -> None:
        for attempt_id, lease, final in self.spool.finals():
            rep = final_report(self.node_id, attempt_id, lease, final, self.spool.last_seq(attempt_id))
            ack = self.stub.ReportStatus(rep, timeout=10)
            if not ack.accepted:
                log.warning("master refused attempt %s's final report: %s", attempt_id, ack.reason)
            self._forget(attempt_id)

    # --- commands ------------------------------------------------------------------------------

    def _handle(self, command: infra_pb2.NodeCommand) -> None:
        which = command.WhichOneof("command")
        if which == "assign":
            a = command.assign
            with self._lock:
                if a.attempt_id in self.held:
                    return  # re-delivered after a reconnect
                self.held[a.attempt_id] = Held(a, active=True)
            self._save(a)
            self.spool.open(a.attempt_id, a.lease_token)
            if self.stopping.is_set():  # sent before the master heard that this node stops: run it elsewhere
                why = f"node {self.opts.name} is stopping (its agent was told to stop): not started"
                self.spool.add(a.attempt_id, "log", {"stream": "agent", "text": why}, None)
                self._final(a, "failed", -1, why, "preempted")
                with self._lock:
                    if (held := self.held.get(a.attempt_id)) is not None:
                        held.active = False
                return
            self._start(a, None, None)
        elif which == "cancel":
            self._revoke(command.cancel.attempt_id, command.cancel.reason or "cancelled", stale=False)
        elif which == "fetch":
            threading.Thread(target=self._upload, args=(command.fetch,), name="upload", daemon=True).start()

    def _upload(self, f: infra_pb2.FetchArtifact) -> None:
        """Answer a FetchArtifact: one UploadArtifact call (node/uploads.py), at most MAX_UPLOADS at once."""
        session = self.session or 0
        if not self._uploads.acquire(blocking=False):
            busy = f"node {self.opts.name} is already sending {MAX_UPLOADS} files; try again shortly"
            messages = iter(
                [
                    infra_pb2.ArtifactChunk(
                        node_id=self.node_id, session=session, transfer_id=f.transfer_id, error=busy, error_kind="busy"
                    )
                ]
            )
            with contextlib.suppress(grpc.RpcError):
                self.stub.UploadArtifact(messages, timeout=30)
            return
        try:
            ack = self.stub.UploadArtifact(
                upload_messages(self.workdir, f, self.node_id, session), timeout=UPLOAD_TIMEOUT_S
            )
            if not ack.accepted:
                log.info("upload of %s/%s ended early: %s", f.experiment, f.path, ack.reason)
        except grpc.RpcError as e:
            log.warning("upload of %s/%s failed: %s", f.experiment, f.path, e.details() or e.code())
        finally:
            self._uploads.release()

    def _revoke(self, attempt_id: int, why: str, stale: bool = True) -> None:
        """Stop an attempt (a cancel, or a lease the master took back). A stale one is forgotten once its
        process has ended: its reports would be refused."""
        with self._lock:
            self.cancelled.add(attempt_id)
            held = self.held.get(attempt_id)
            if held is None:
                return
        if not stale:  # a user's cancel outlives this agent process: a restarted one honours it too
            with contextlib.suppress(OSError):
                self._cancel_marker(attempt_id).write_text(why, encoding="utf-8")
        with self._lock:
            held.stale = held.stale or stale
            run, active = held.run, held.active
        log.info("stopping attempt %s: %s", attempt_id, why)
        if run is not None and active:
            threading.Thread(target=run.cancel, daemon=True).start()
        elif stale and not active:  # it ended; only its report was left, which would be refused
            self._forget(attempt_id)

    def _start(self, a: infra_pb2.Assignment, command: Command | None, position: dict[str, int] | None) -> None:
        threading.Thread(
            target=self._run_attempt, args=(a, command, position), name=f"attempt-{a.attempt_id}", daemon=True
        ).start()

    def _report_running(self, a: infra_pb2.Assignment) -> bool | None:
        """Tell the master the attempt starts (its answer is the lease check); None: gave up (stopping)."""
        rep = infra_pb2.StageStatusReport(
            node_id=self.node_id, attempt_id=a.attempt_id, lease_token=a.lease_token, state=infra_pb2.RUNNING
        )
        delay = 0.25
        while not self.stop.is_set():
            try:
                ack = self.stub.ReportStatus(rep, timeout=10)
            except grpc.RpcError as e:
                log.warning("status report for attempt %s failed: %s", a.attempt_id, e.details() or e.code())
                delay = self._backoff(delay)
                continue
            if not ack.accepted:
                log.warning("master refused attempt %s: %s", a.attempt_id, ack.reason)
            return ack.accepted
        return None

    def _final(self, a: infra_pb2.Assignment, state: str, exit_code: int, message: str, failure: str = "") -> None:
        with self._lock:
            held = self.held.get(a.attempt_id)
            stale = held is None or held.stale
        if stale:
            self._forget(a.attempt_id)
        else:
            self.spool.finish(a.attempt_id, state, exit_code, message, failure)

    def _run_attempt(self, a: infra_pb2.Assignment, command: Command | None, position: dict[str, int] | None) -> None:
        box: list[StageRun] = []

        def emit(type_: str, body: dict[str, Any]) -> None:
            self.spool.add(a.attempt_id, type_, body, box[0].position if box else None)

        try:
            if command is None:
                command, problem, failure = self._build(a)
                if command is None:
                    emit("log", {"stream": "agent", "text": problem})
                    self._final(a, "failed", -1, problem, failure)
                    return
                self._save(a, command)
            exp_dir = experiment_dir(self.workdir, a.experiment)
            start_record(exp_dir, with_defaults(json.loads(a.plan_json)) if a.plan_json else None)
            run = StageRun(
                command,
                exp_dir,
                a.stage,
                self.workdir,
                list(a.gpu_indices),
                emit,
                a.attempt,
                resume_from=position,
                watchdog=self.disk.stop_reason,
                member=a.rendezvous.node_rank if a.HasField("rendezvous") else 0,
            )
            box.append(run)
            accepted = self._report_running(a)
            if accepted is None:
                return  # the agent stops: a later agent process picks the attempt up
            with self._lock:
                held = self.held.get(a.attempt_id)
                if held is not None:
                    held.run = run
                cancelled = a.attempt_id in self.cancelled or held is None or held.stale
                preempt = self._preempt
            if preempt is not None:  # the stop deadline passed while it was being prepared
                run.stop(preempt, "preempted", 0.0 if self.stop_now.is_set() else None)
            if not accepted:  # a stale copy: a recovered step that still runs is adopted only to be stopped
                with self._lock:
                    if held is not None:
                        held.stale = True
                cancelled = True
            if cancelled:
                run.cancel()
            result = run.run()
            log.info(
                "attempt %s ended %s%s: %s",
                a.attempt_id,
                result.state,
                f" ({result.failure})" if result.failure else "",
                result.message or f"exit {result.exit_code}",
            )
            self._final(a, result.state, result.exit_code, result.message, result.failure)
        except Exception as e:  # a bug here must not leave the attempt hanging at the master
            log.exception("attempt %s", a.attempt_id)
            self._final(a, "failed", -1, f"node agent error: {type(e).__name__}: {e}", "infra")
        finally:
            with self._lock:
                if (held := self.held.get(a.attempt_id)) is not None:
                    held.active = False

    def _build(self, a: infra_pb2.Assignment) -> tuple[Command | None, str, str]:
        """The attempt's commands, or why not and the failure class: what the plan asks for (names, params)
        is the stage's ``error`` (a retry elsewhere would fail alike); what this node lacks (disk, the kind,
        e.g. a plugin that failed to load) is ``infra``."""
        try:  # the experiment key and stage name from the master become folders: the layout's rule
            exp_dir = experiment_dir(self.workdir, a.experiment)
            check_stage_name(a.stage)
        except LayoutError as e:
            return None, f"refusing unsafe directory names {a.experiment!r}/{a.stage!r}: {e}", "error"
        unavailable = self.disk.unavailable()
        if unavailable:
            return None, f"node {self.opts.name}: {unavailable}", "infra"
        try:
            kind = get_stage_kind(a.kind)
        except KeyError as e:
            return None, f"node {self.opts.name}: " + str(e).strip("'\""), "infra"
        try:
            params = kind.params.model_validate(json.loads(a.params_json or "{}"))
            world = world_size(Resources(gpus=len(a.gpu_indices), processes=a.resources.processes or 1))
            rdzv = None
            if a.HasField("rendezvous"):
                z = a.rendezvous
                rdzv = Rendezvous(z.endpoint, z.nnodes, z.node_rank, z.run_id)
            return kind.build(params, stage_context(exp_dir, a.stage, a.smoke, a.attempt, world, rdzv)), "", ""
        except ValidationError as e:
            return None, "invalid params: " + "; ".join(str(i) for i in validation_issues(e, "params")), "error"
        except (KeyError, ValueError) as e:
            return None, str(e).strip("'\""), "error"

    # --- main ----------------------------------------------------------------------------------

    def run(self) -> int:
        recovered = self.recover()
        if self._retrying("register", self.ensure_registered) is None:
            print(f"infra node: {self.fatal or 'stopped before registering'}", file=sys.stderr)
            return 2 if self.fatal else 0
        print(
            f"infra node {self.opts.name} ({self.node_id}) registered with {self.opts.master}; "
            f"workdir {self.workdir}; kinds {', '.join(self.facts['stage_kinds'])}; "
            f"gpus {len(self.gpus.gpus)} [{self.gpus.status}]"
            + (f"; {recovered} attempt(s) recovered" if recovered else ""),
            flush=True,
        )
        threads = [
            threading.Thread(target=f, name=f.__name__, daemon=True)
            for f in (self.heartbeat_loop, self.stream_loop, self.send_loop)
        ]
        for t in threads:
            t.start()
        self._serving = True
        self._wake.wait()
        if not self.stop.is_set():
            self.graceful_stop()
        self.shutdown(threads[2])
        if self.fatal:
            print(f"infra node: {self.fatal}", file=sys.stderr)
        return 2 if self.fatal else 0

    def signal(self) -> None:
        """SIGTERM/SIGINT: the first begins a graceful stop, a second one stops the stages now."""
        if self.stopping.is_set():
            self.stop_now.set()
        self.stopping.set()
        if not self._serving:  # still registering: nothing runs for this process yet, stop trying
            self.stop.set()
        self._wake.set()

    def graceful_stop(self) -> None:
        """Take no new work (heartbeats say ``stopping``), let the running stages finish within
        ``--stop-deadline``, then stop the rest (failed, ``preempted``: the master runs them elsewhere) and
        deliver their reports while heartbeats still go."""
        deadline = time.monotonic() + self.opts.stop_deadline
        with self._lock:
            running = sum(h.active for h in self.held.values())
        log.info(
            "stopping: no new stages; %d running get %g s to finish (--stop-deadline)", running, self.opts.stop_deadline
        )
        self._beat_now.set()
        while self._any_active() and not self.stop_now.is_set() and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.stop_now.wait(min(left, 0.2))
        self._preempt_all()
        hurried = self.stop_now.is_set()
        until = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < until and not self.stop.is_set() and (self._any_active() or not self.spool.idle()):
            if self.stop_now.is_set() and not hurried:  # a second signal: no TERM grace for what still runs
                hurried = True
                self._preempt_all()
            time.sleep(0.1)

    def _preempt_all(self, reason: str | None = None) -> None:
        """Stop every attempt this agent still runs: each ends failed, ``preempted`` (after a second signal
        without the TERM grace)."""
        now = self.stop_now.is_set()
        reason = reason or (
            f"the node agent of {self.opts.name} was stopped"
            + ("" if now else f" and its stop deadline ({self.opts.stop_deadline:g} s) passed")
            + ": run again elsewhere"
        )
        with self._lock:
            self._preempt = self._preempt or reason
            runs = [h.run for h in self.held.values() if h.run is not None and h.active]
        for r in runs:
            threading.Thread(target=r.stop, args=(reason, "preempted", 0.0 if now else None), daemon=True).start()

    def shutdown(self, sender: threading.Thread | None = None) -> None:
        """Stop the stages that still run (each reports itself failed, preempted), deliver what can be, close."""
        self._preempt_all(f"the node agent of {self.opts.name} stopped: {self.fatal}" if self.fatal else None)
        self.stop.set()
        self._wake.set()
        self._beat_now.set()
        if self._stream is not None:
            self._stream.cancel()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self._any_active():
            time.sleep(0.1)
        if sender is not None:
            sender.join(15)
        self.spool.sync()
        self.conn.close()

    def _any_active(self) -> bool:
        with self._lock:
            return any(h.active for h in self.held.values())


def main(opts: Options) -> int:
    logging.basicConfig(
        level=opts.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    listing = node_facts.PluginListing.start(opts.workdir, opts.plugin_timeout)  # runs while the rest loads
    problems: list[str] = []
    load_stage_modules(timeout=opts.plugin_timeout, problems=problems, files=workdir_stage_plugins(opts.workdir))
    for problem in problems:
        log.error("%s; the node starts without it", problem)
    plugin_extras, plugin_problems = listing.result()
    for problem in plugin_problems:
        log.error("%s", problem)
    agent = Agent(opts, problems + plugin_problems, plugin_extras)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.signal())
    return agent.run()
