"""``infra node``: register with the master, heartbeat, take assignments, run stages, report.

Every connection is opened by the agent (a node behind NAT needs no inbound port): unary calls for
registration, heartbeats, events and status, and one long-lived server stream for commands. Threads:
heartbeat, command stream, event sender, and one per running stage attempt.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import ParseDict
from pydantic import ValidationError

from infra.plan import validation_issues
from infra.stages import StageContext, get_stage_kind, load_stage_modules
from node import facts as node_facts
from node.identity import node_id as load_node_id
from node.runner import StageRun
from protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

log = logging.getLogger("infra.node")
BATCH = 1000
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
]


class FatalError(Exception):
    pass


def _event(attempt_id: int, lease: str, seq: int, type_: str, body: dict[str, Any]) -> infra_pb2.Event:
    ev = infra_pb2.Event(attempt_id=attempt_id, lease_token=lease, seq=seq, time=time.time())
    if type_ == "metric":
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
    elif type_ == "artifact":
        ev.artifact.path, ev.artifact.kind = body["path"], body["kind"]
    elif type_ == "progress":
        ev.progress.what, ev.progress.done = body["what"], body["done"]
        if body.get("total") is not None:
            ev.progress.total, ev.progress.has_total = int(body["total"]), True
    else:
        ev.log.stream, ev.log.text = body.get("stream", ""), body.get("text", "")
    return ev


class Outbox:
    """Events waiting for the master's acknowledgement, in order, each numbered per attempt."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[infra_pb2.Event] = []
        self._seq: dict[int, int] = {}

    def add(self, attempt_id: int, lease: str, type_: str, body: dict[str, Any]) -> None:
        with self._cond:
            seq = self._seq[attempt_id] = self._seq.get(attempt_id, 0) + 1
            self._pending.append(_event(attempt_id, lease, seq, type_, body))
            self._cond.notify_all()

    def last_seq(self, attempt_id: int) -> int:
        with self._cond:
            return self._seq.get(attempt_id, 0)

    def peek(self, wait: float) -> list[infra_pb2.Event]:
        with self._cond:
            if not self._pending:
                self._cond.wait(wait)
            return self._pending[:BATCH]

    def acked(self, n: int, rejected: set[int]) -> None:
        with self._cond:
            del self._pending[:n]
            if rejected:
                self._pending = [e for e in self._pending if e.attempt_id not in rejected]
            self._cond.notify_all()

    def wait_flushed(self, attempt_id: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(e.attempt_id == attempt_id for e in self._pending):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


@dataclass
class Options:
    master: str
    workdir: Path
    name: str
    heartbeat: float = 5.0
    cpus: int | None = None
    memory_mib: int | None = None
    fake_gpus: int | None = None


class Agent:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.workdir = opts.workdir
        self.node_id = load_node_id(self.workdir, opts.name)
        self.gpus = node_facts.probe_gpus(opts.fake_gpus)
        self.facts = node_facts.collect_facts(self.workdir, opts.name, self.gpus, opts.cpus, opts.memory_mib)
        self.channel = grpc.insecure_channel(opts.master, options=CHANNEL_OPTIONS)
        self.stub = infra_pb2_grpc.NodeServiceStub(self.channel)
        self.stop = threading.Event()
        self.outbox = Outbox()
        self.session: int | None = None
        self._reg_lock = threading.Lock()
        self._runs_lock = threading.Lock()
        self.runs: dict[int, tuple[infra_pb2.Assignment, StageRun | None]] = {}
        self.cancelled: set[int] = set()  # cancels that arrived before (or without) their assignment
        self._stream: Any = None
        self.fatal: str | None = None

    # --- registration --------------------------------------------------------------------------

    def ensure_registered(self) -> int:
        with self._reg_lock:
            if self.session is not None:
                return self.session
            with self._runs_lock:
                running = [
                    infra_pb2.RunningAttempt(attempt_id=a.attempt_id, lease_token=a.lease_token)
                    for a, _ in self.runs.values()
                ]
            req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=self.node_id, running=running)
            ParseDict(self.facts, req.facts)
            try:
                resp = self.stub.Register(req, timeout=10)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                    raise FatalError(f"the master refused this node: {e.details()}") from None
                raise
            self.session = resp.session
            log.info("registered with %s as %s (%s)", self.opts.master, self.opts.name, self.node_id)
            return resp.session

    def _forget_session(self, session: int) -> None:
        with self._reg_lock:
            if self.session == session:
                self.session = None

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """Call ``fn`` until it works or the agent stops; a fatal refusal stops the agent."""
        delay = 0.5
        while not self.stop.is_set():
            try:
                return fn()
            except FatalError as e:
                self.fatal = str(e)
                self.stop.set()
            except grpc.RpcError as e:
                log.warning("%s: %s; retrying in %.1fs", what, e.details() or e.code(), delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    # --- loops ---------------------------------------------------------------------------------

    def heartbeat_loop(self) -> None:
        node_facts.usage(self.workdir, self.gpus)  # prime psutil's CPU counter
        while not self.stop.wait(self.opts.heartbeat):
            session = self._retrying("register", self.ensure_registered)
            if session is None:
                return
            req = infra_pb2.HeartbeatRequest(node_id=self.node_id, session=session)
            ParseDict(node_facts.usage(self.workdir, self.gpus), req.usage)
            with self._runs_lock:
                for a, _ in self.runs.values():
                    req.running.add(attempt_id=a.attempt_id, lease_token=a.lease_token)
            try:
                if self.stub.Heartbeat(req, timeout=max(2.0, self.opts.heartbeat)).reregister:
                    self._forget_session(session)
            except grpc.RpcError as e:
                log.warning("heartbeat failed: %s", e.details() or e.code())

    def stream_loop(self) -> None:
        delay = 0.5
        while not self.stop.is_set():
            session = self._retrying("register", self.ensure_registered)
            if session is None:
                return
            try:
                self._stream = self.stub.Assignments(
                    infra_pb2.AssignmentStreamRequest(node_id=self.node_id, session=session)
                )
                for command in self._stream:
                    delay = 0.5
                    self._handle(command)
            except grpc.RpcError as e:
                if self.stop.is_set():
                    return
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self._forget_session(session)
                log.warning("command stream: %s; reconnecting in %.1fs", e.details() or e.code(), delay)
            self.stop.wait(delay)
            delay = min(delay * 2, 10.0)

    def send_loop(self) -> None:
        while not (self.stop.is_set() and not self.runs):
            batch = self.outbox.peek(0.2)
            if not batch:
                continue
            try:
                ack = self.stub.ReportEvents(infra_pb2.EventBatch(node_id=self.node_id, events=batch), timeout=30)
            except grpc.RpcError as e:
                log.warning("sending %d events failed: %s", len(batch), e.details() or e.code())
                time.sleep(1.0)
                continue
            rejected = set(ack.rejected_attempts)
            self.outbox.acked(len(batch), rejected)
            for attempt_id in rejected:  # the master moved on: stop that attempt
                self._cancel_local(attempt_id)

    # --- commands ------------------------------------------------------------------------------

    def _handle(self, command: infra_pb2.NodeCommand) -> None:
        which = command.WhichOneof("command")
        if which == "assign":
            a = command.assign
            with self._runs_lock:
                if a.attempt_id in self.runs:
                    return  # re-delivered after a reconnect
                self.runs[a.attempt_id] = (a, None)
            threading.Thread(target=self._run_attempt, args=(a,), name=f"attempt-{a.attempt_id}", daemon=True).start()
        elif which == "cancel":
            self._cancel_local(command.cancel.attempt_id)

    def _cancel_local(self, attempt_id: int) -> None:
        with self._runs_lock:
            entry = self.runs.get(attempt_id)
            self.cancelled.add(attempt_id)
        if entry is not None and entry[1] is not None:
            threading.Thread(target=entry[1].cancel, daemon=True).start()

    def _report(self, a: infra_pb2.Assignment, state: int, exit_code: int = 0, message: str = "") -> bool:
        rep = infra_pb2.StageStatusReport(
            node_id=self.node_id,
            attempt_id=a.attempt_id,
            lease_token=a.lease_token,
            state=state,
            exit_code=exit_code,
            message=message,
            last_seq=self.outbox.last_seq(a.attempt_id),
        )
        deadline = time.monotonic() + (15 if self.stop.is_set() else 3600)
        delay = 0.5
        while time.monotonic() < deadline:
            try:
                ack = self.stub.ReportStatus(rep, timeout=10)
            except grpc.RpcError as e:
                log.warning("status report for attempt %s failed: %s", a.attempt_id, e.details() or e.code())
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if not ack.accepted:
                log.warning("master refused attempt %s report: %s", a.attempt_id, ack.reason)
            return ack.accepted
        return False

    def _run_attempt(self, a: infra_pb2.Assignment) -> None:
        emit = lambda type_, body: self.outbox.add(a.attempt_id, a.lease_token, type_, body)
        try:
            run = self._prepare(a, emit)
            if run is None:
                return
            with self._runs_lock:
                self.runs[a.attempt_id] = (a, run)
                if a.attempt_id in self.cancelled:
                    run.cancel()
            if not self._report(a, infra_pb2.RUNNING):
                return
            result = run.run()
            state, message = result.state, result.message
            if state == "cancelled" and self.stop.is_set() and a.attempt_id not in self.cancelled:
                state, message = "failed", "the node agent was stopped"
            self.outbox.wait_flushed(a.attempt_id, 60)
            self._report(a, infra_pb2.StageState.Value(state.upper()), result.exit_code, message)
        finally:
            with self._runs_lock:
                self.runs.pop(a.attempt_id, None)

    def _prepare(self, a: infra_pb2.Assignment, emit: Callable[[str, dict[str, Any]], None]) -> StageRun | None:
        """Build the attempt's commands; a kind or params this node cannot use fails the attempt, named."""
        exp_dir = self.workdir / "experiments" / a.experiment
        stage_dir = exp_dir / a.stage
        try:
            kind = get_stage_kind(a.kind)
            params = kind.params.model_validate(json.loads(a.params_json or "{}"))
            command = kind.build(params, StageContext(exp_dir, stage_dir, a.smoke, a.attempt))
        except ValidationError as e:
            problem = "invalid params: " + "; ".join(str(i) for i in validation_issues(e, "params"))
        except (KeyError, ValueError) as e:
            problem = str(e).strip("'\"")
        else:
            return StageRun(command, stage_dir, self.workdir, list(a.gpu_indices), emit, a.attempt)
        emit("log", {"stream": "agent", "text": problem})
        self.outbox.wait_flushed(a.attempt_id, 30)
        self._report(a, infra_pb2.FAILED, -1, problem)
        return None

    # --- main ----------------------------------------------------------------------------------

    def run(self) -> int:
        if self._retrying("register", self.ensure_registered) is None:
            print(f"infra node: {self.fatal or 'stopped before registering'}", file=sys.stderr)
            return 2 if self.fatal else 0
        print(
            f"infra node {self.opts.name} ({self.node_id}) registered with {self.opts.master}; "
            f"workdir {self.workdir}; kinds {', '.join(self.facts['stage_kinds'])}; "
            f"gpus {len(self.gpus.gpus)} [{self.gpus.status}]",
            flush=True,
        )
        threads = [
            threading.Thread(target=f, name=f.__name__, daemon=True)
            for f in (self.heartbeat_loop, self.stream_loop, self.send_loop)
        ]
        for t in threads:
            t.start()
        self.stop.wait()
        self.shutdown()
        if self.fatal:
            print(f"infra node: {self.fatal}", file=sys.stderr)
        return 2 if self.fatal else 0

    def shutdown(self) -> None:
        """Stop the stages (each reports itself failed: the agent went away), flush, close."""
        self.stop.set()
        if self._stream is not None:
            self._stream.cancel()
        with self._runs_lock:
            runs = [r for _, r in self.runs.values() if r is not None]
        for r in runs:
            threading.Thread(target=r.cancel, daemon=True).start()
        deadline = time.monotonic() + 20
        while self.runs and time.monotonic() < deadline:
            time.sleep(0.1)
        self.channel.close()


def main(opts: Options) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    load_stage_modules()
    agent = Agent(opts)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop.set())
    return agent.run()
