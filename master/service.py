"""gRPC servicers: translate messages to controller calls and controller results to messages.

The controller takes and returns plain values; the node protocol's messages are translated by
``master/wire.py`` (:class:`~master.wire.NodeAPI`), the client protocol's here.

Who may do what is decided here (the interceptor in ``master/auth.py`` has already authenticated the
caller): a user reads and cancels only their own experiments, an admin any, and only an admin manages
tokens and drains nodes. Another user's experiment is PERMISSION_DENIED, named.

No database or SQL text reaches a client: an unexpected exception in a handler (a database error, an
overflow) is logged with its detail and a reference number, and the caller gets ``INTERNAL`` with a
short message naming only that number (:func:`shielded`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from infra.master import auth, store
from infra.master.artifacts import ArtifactError
from infra.master.auth import Identity
from infra.master.controller import Controller
from infra.master.errors import NotFound, Refused
from infra.master.state import RUNNING
from infra.master.wire import NodeAPI, ProtocolMismatch
from infra.protos import MAX_MESSAGE_BYTES, infra_pb2, infra_pb2_grpc
from infra.spec.plan import PlanError, stage_nodes, stage_processes

STATES = {k.lower(): v for k, v in infra_pb2.StageState.items()}
DEFAULT_STATUS_LIMIT = 50
UNPAGED_METRICS_BYTES = MAX_MESSAGE_BYTES - (1 << 20)  # an answer to a client that asks for no page
log = logging.getLogger("infra.master")
_refs = itertools.count(1)
ARTIFACT_CODES = {  # the rest (offline, too_large, busy, failed) are FAILED_PRECONDITION, with the message
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
}
C = TypeVar("C", bound=type)


async def _internal(context: grpc.aio.ServicerContext, method: str) -> None:
    ref = next(_refs)
    log.exception("%s failed (error ref %d)", method, ref)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the master (ref {ref}); its log has the detail")


def _shield(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _internal(context, method)

        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _internal(context, method)

    return unary


def shielded(cls: C) -> C:
    """Wrap every RPC method of a servicer so that an unexpected exception becomes a short ``INTERNAL``
    error (grpc's own default sends ``Unexpected <type>: <message>``, e.g. a whole SQL statement)."""
    for name, fn in list(vars(cls).items()):
        if name[:1].isupper() and inspect.isfunction(fn):
            setattr(cls, name, _shield(name, fn))
    return cls


def _state(name: str) -> int:
    return STATES.get(name, 0)


@shielded
class NodeServicer(infra_pb2_grpc.NodeServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.c = NodeAPI(controller)
        self.metrics = controller.metrics

    async def Register(self, request: infra_pb2.RegisterRequest, context: grpc.aio.ServicerContext) -> Any:
        remaining = context.time_remaining()
        if context.cancelled() or (remaining is not None and remaining <= 0):
            # Queued past its deadline in a registration storm: the node has given up and will register
            # again, so committing this one too would only lengthen the queue for everyone behind it.
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the registration waited past its deadline")
        try:
            return await self.c.register(request)
        except ProtocolMismatch as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def HeartbeatStream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """The node's heartbeats, each answered in order. Read and written on the call itself rather than
        through request and response generators: per message that is a few objects and awaits fewer, on a
        path that carries every node's heartbeats. A stream that breaks needs nothing here: the node falls
        silent, and the lost timeout decides as it does for heartbeats that stop."""
        heartbeat, observe = self.c.heartbeat, self.metrics.heartbeat.observe
        while (request := await context.read()) is not grpc.aio.EOF:
            started = time.perf_counter()
            reply = heartbeat(request)
            observe(time.perf_counter() - started)
            await context.write(reply)

    async def Heartbeat(self, request: infra_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext) -> Any:
        """A heartbeat as one call, from agents of earlier infra.v1 releases (today's agents use the stream)."""
        started = time.perf_counter()
        reply = self.c.heartbeat(request)
        self.metrics.heartbeat.observe(time.perf_counter() - started)
        return reply

    async def Assignments(
        self,
        request: infra_pb2.AssignmentStreamRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[infra_pb2.NodeCommand]:
        try:
            async for command in self.c.assignments(request.node_id, request.session):
                yield command
        except NotFound as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def UploadArtifact(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.c.upload(request_iterator)

    async def ReportEvents(self, request: infra_pb2.EventBatch, context: grpc.aio.ServicerContext) -> Any:
        stored, rejected = await self.c.report_events(request)
        self.metrics.events_stored.inc(stored)
        return infra_pb2.EventAck(stored=stored, rejected_attempts=rejected)

    async def ReportStatus(self, request: infra_pb2.StageStatusReport, context: grpc.aio.ServicerContext) -> Any:
        accepted, reason = await self.c.report_status(request)
        return infra_pb2.StageStatusAck(accepted=accepted, reason=reason)


@shielded
class ClientServicer(infra_pb2_grpc.ClientServiceServicer):
    def __init__(self, controller: Controller, authenticator: auth.Authenticator | None = None) -> None:
        self.c = controller
        self.auth = authenticator

    def _me(self) -> Identity:
        return auth.current(self.auth is not None)

    async def _may_access(self, context: grpc.aio.ServicerContext, key: str, owner: str | None) -> None:
        me = self._me()
        if not me.admin and owner != me.user:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"experiment {key!r} belongs to {owner or 'nobody'!r}; user {me.user!r} may only access their own",
            )

    async def _experiment_owner(self, context: grpc.aio.ServicerContext, key: str) -> None:
        exists, owner = await self.c.read(store.experiment_owner, self.c.engine, key)
        if not exists:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no experiment {key!r}")
        await self._may_access(context, key, owner)

    async def Submit(self, request: infra_pb2.SubmitRequest, context: grpc.aio.ServicerContext) -> Any:
        me = self._me()
        try:
            key = await self.c.submit(request.plan_json, owner=me.user if self.auth is not None else None)
        except PlanError as e:
            return infra_pb2.SubmitResponse(
                errors=[infra_pb2.PlanError(path=i.path, message=i.message) for i in e.issues]
            )
        return infra_pb2.SubmitResponse(experiment=key)

    async def GetStatus(self, request: infra_pb2.StatusRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.experiment:
            await self._experiment_owner(context, request.experiment)
        me = self._me()
        exps = await self.c.read(
            store.status,
            self.c.engine,
            request.experiment or None,
            request.limit or DEFAULT_STATUS_LIMIT,
            None if me.admin else me.user,
        )
        if request.experiment and not exps:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no experiment {request.experiment!r}")
        experiments = [_experiment(e) for e in exps]
        for e in experiments:
            self._add_progress(e)
        return infra_pb2.StatusResponse(nodes=self._nodes(), experiments=experiments)

    def _add_progress(self, e: infra_pb2.ExperimentStatus) -> None:
        """The latest progress of each running stage, from memory (the master keeps it only while it runs)."""
        exp = self.c.experiments.get(e.experiment)
        if exp is None:
            return
        running = {st.name: st.current for st in exp.stages if st.current is not None and st.current.state == RUNNING}
        for s in e.stages:
            att = running.get(s.name)
            if att is None:
                continue
            for what, (done, total) in att.progress.items():
                s.progress.add(what=what, done=done, total=total or 0, has_total=total is not None)

    def _nodes(self) -> list[infra_pb2.NodeStatus]:
        now = time.time()
        out = []
        for n in sorted(self.c.nodes.values(), key=lambda n: n.name):
            if n.facts_message is None:  # parsed once per registration, not per status call
                n.facts_message = infra_pb2.NodeFacts()
                _fill(n.facts_message, n.facts)
            out.append(
                infra_pb2.NodeStatus(
                    node_id=n.id,
                    facts=n.facts_message,
                    online=self.c.online(n),
                    heartbeat_age_s=now - n.last_heartbeat if n.last_heartbeat is not None else -1,
                    usage=n.usage,
                    allocated=infra_pb2.Resources(
                        gpus=len(n.used_gpus), cpus=n.used_cpus, memory_mib=n.used_memory_mib
                    ),
                    allocated_gpus=sorted(n.used_gpus),
                    state=self.c.node_state(n),
                    unavailable=n.unavailable,
                    drained=n.drained,
                    drain_deadline=n.drain_deadline or 0,
                )
            )
        return out

    async def _stage(self, ref: infra_pb2.StageRef, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        row = await self.c.read(store.find_stage, self.c.engine, ref.experiment, ref.stage, ref.stage_id)
        if row is None:
            what = f"stage id {ref.stage_id}" if ref.stage_id else f"stage {ref.experiment}/{ref.stage}"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no {what}")
        await self._may_access(context, row["key"], row["owner"])
        return row  # type: ignore[return-value]

    async def _member(self, stage: dict[str, Any], member: int, context: grpc.aio.ServicerContext) -> None:
        """Refuse a member the stage does not have, naming the gang's size, before any reading starts."""
        if not member:
            return
        size = await self.c.read(store.gang_size, self.c.engine, stage["id"])
        if size < 2:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"member: stage {stage['name']} is not a gang (it runs on one node); only member 0 exists",
            )
        if member >= size:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"member: stage {stage['name']} is a gang of {size} members (0 to {size - 1}); "
                f"there is no member {member}",
            )

    async def GetLogs(
        self,
        request: infra_pb2.LogsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[infra_pb2.LogRecord]:
        """Every line, streamed a page of rows at a time (no cap: the stream is the pagination)."""
        stage = await self._stage(request.stage, context)
        await self._member(stage, request.member, context)
        attempt, after = request.attempt, request.after_seq
        while True:
            if not request.attempt:  # follow the latest attempt (a retry starts a new one)
                latest = await self.c.read(store.latest_attempt, self.c.engine, stage["id"])
                if latest != attempt:
                    attempt, after = latest, 0
            state = await self.c.read(store.stage_state, self.c.engine, stage["id"])
            sent = 0
            while True:
                rows = await self.c.read(
                    store.events,
                    self.c.engine,
                    stage["id"],
                    ("log", "dropped"),
                    attempt,
                    after,
                    store.PAGE_SIZE,
                    0,
                    request.member,
                )
                for r in rows:
                    after = r["seq"]
                    stream, text = _log_line(r)
                    yield infra_pb2.LogRecord(
                        attempt=r["attempt"], seq=r["seq"], time=r["time"], stream=stream, text=text
                    )
                sent += len(rows)
                if len(rows) < store.PAGE_SIZE:
                    break
            if not request.follow or (state in ("succeeded", "failed", "cancelled") and not sent):
                return
            if not sent:
                await self.c.wait_for_events(1.0)

    async def GetMetrics(self, request: infra_pb2.MetricsRequest, context: grpc.aio.ServicerContext) -> Any:
        """One page after the request's cursor; or, for a client that asks for no page (page_size 0, clients
        before paging), every record, read a page at a time, if they fit one message."""
        stage = await self._stage(request.stage, context)
        await self._member(stage, request.member, context)
        attempt = request.attempt or None
        if request.page_size:
            size = min(request.page_size, store.MAX_PAGE_SIZE)
            rows = await self.c.read(
                store.events,
                self.c.engine,
                stage["id"],
                ("metric",),
                attempt,
                request.after_seq,
                size + 1,
                request.after_attempt,
                request.member,
            )
            return infra_pb2.MetricsResponse(metrics=[_metric(r) for r in rows[:size]], more=len(rows) > size)
        out: list[infra_pb2.MetricRecord] = []
        size_bytes, cursor = 0, (0, 0)
        while True:
            rows = await self.c.read(
                store.events,
                self.c.engine,
                stage["id"],
                ("metric",),
                attempt,
                cursor[1],
                store.PAGE_SIZE,
                cursor[0],
                request.member,
            )
            for r in rows:
                out.append(_metric(r))
                size_bytes += out[-1].ByteSize() + 8
            if size_bytes > UNPAGED_METRICS_BYTES:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the metrics of this stage do not fit one message (over {UNPAGED_METRICS_BYTES >> 20} MiB, "
                    f"more than {len(out)} records); use a newer infra client, which reads them in pages",
                )
            if len(rows) < store.PAGE_SIZE:
                return infra_pb2.MetricsResponse(metrics=out)
            cursor = (rows[-1]["attempt"], rows[-1]["seq"])

    async def ListArtifacts(self, request: infra_pb2.ArtifactsRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._experiment_owner(context, request.experiment)
        rows = await self.c.read(store.artifacts, self.c.engine, request.experiment)
        return infra_pb2.ArtifactsResponse(
            artifacts=[
                infra_pb2.ArtifactRecord(
                    stage=r["stage"],
                    attempt=r["attempt"],
                    node_id=r["node_id"],
                    node_name=r["node_name"],
                    time=r["time"],
                    artifact=infra_pb2.Artifact(path=r["data"]["path"], kind=r["data"]["kind"]),
                )
                for r in rows
            ]
        )

    async def GetArtifact(
        self, request: infra_pb2.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[infra_pb2.ArtifactData]:
        """A file of the record, relayed from its node (``master/artifacts.py``); a client that goes away
        ends the node's upload too."""
        relay = self.c.artifacts
        answer = relay.pieces(request.experiment, request.path, request.offset, user=self._me(), stat=request.stat)
        try:
            async with contextlib.aclosing(answer):
                async for p in answer:
                    yield infra_pb2.ArtifactData(
                        offset=p.offset, data=p.data, size=p.size, last=p.last, sha256=p.sha256, node_id=p.node_id
                    )
        except ArtifactError as e:
            await context.abort(ARTIFACT_CODES.get(e.kind, grpc.StatusCode.FAILED_PRECONDITION), str(e))

    async def Cancel(self, request: infra_pb2.CancelRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._experiment_owner(context, request.experiment)
        try:
            cancelled, signalled, finished = await self.c.cancel(request.experiment, request.reason)
        except NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return infra_pb2.CancelResponse(cancelled=cancelled, signalled=signalled, finished=finished)

    async def DrainNode(self, request: infra_pb2.DrainNodeRequest, context: grpc.aio.ServicerContext) -> Any:
        if not self._me().admin:  # the interceptor refuses users already; no-auth callers are admins
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "draining a node needs an admin token")
        if request.deadline_s < 0 or request.deadline_s > 365 * 86400:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "deadline must be 0 to 31536000 seconds")
        try:
            node = await self.c.drain(request.node, request.undrain, request.deadline_s)
        except NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        status = next(n for n in self._nodes() if n.node_id == node.id)
        return infra_pb2.DrainNodeResponse(node=status, running=len(node.attempts))

    async def Rerun(self, request: infra_pb2.RerunRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._experiment_owner(context, request.experiment)
        try:
            stages = await self.c.rerun(request.experiment, request.stage, self._me().user)
        except NotFound as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except Refused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return infra_pb2.RerunResponse(stages=stages)

    async def CreateToken(self, request: infra_pb2.CreateTokenRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            auth.check_new_token(request.user, request.role or "user")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        token, row = await self.c.commit(lambda s: auth.create_token(s, request.user, request.role or "user"))
        return infra_pb2.CreateTokenResponse(token=token, info=_token_info(row))

    async def ListTokens(self, request: infra_pb2.ListTokensRequest, context: grpc.aio.ServicerContext) -> Any:
        rows = await self.c.read(auth.list_tokens, self.c.engine)
        return infra_pb2.ListTokensResponse(tokens=[_token_info(r) for r in rows])

    async def RevokeToken(self, request: infra_pb2.RevokeTokenRequest, context: grpc.aio.ServicerContext) -> Any:
        revoked = await self.c.commit(lambda s: auth.revoke_token(s, request.id))
        if self.auth is not None:
            self.auth.forget(request.id)
        return infra_pb2.RevokeTokenResponse(revoked=revoked)


def _token_info(row: dict[str, Any]) -> infra_pb2.TokenInfo:
    return infra_pb2.TokenInfo(
        id=row["id"], user=row["user"], role=row["role"], created_at=row["created_at"], revoked=bool(row["revoked_at"])
    )


def _metric(r: dict[str, Any]) -> infra_pb2.MetricRecord:
    values = r["data"].get("values", {})
    metric = infra_pb2.Metric(
        step=int(r["data"].get("step", 0)),
        values={k: v for k, v in values.items() if v is not None},
        null_values=[k for k, v in values.items() if v is None],
    )
    return infra_pb2.MetricRecord(attempt=r["attempt"], seq=r["seq"], time=r["time"], metric=metric)


def _log_line(row: dict[str, Any]) -> tuple[str, str]:
    """A log event as (stream, text); a spool-overflow marker becomes an agent line saying what was lost."""
    d = row["data"]
    if row["type"] != "dropped":
        return d.get("stream", ""), d.get("text", "")
    what = ", ".join(f"{d[k]} {k}" for k in ("logs", "metrics", "progress") if d.get(k))
    return "agent", f"{d.get('count', 0)} events dropped ({what}; seq {d.get('first_seq')}-{d.get('last_seq')}): " + (
        d.get("reason") or "the node's event spool was full"
    )


def _fill(msg: Any, data: dict[str, Any]) -> None:
    from google.protobuf.json_format import ParseDict

    ParseDict(data, msg, ignore_unknown_fields=True)


def _experiment(e: dict[str, Any]) -> infra_pb2.ExperimentStatus:
    processes, nodes = stage_processes(e["plan"]), stage_nodes(e["plan"])
    return infra_pb2.ExperimentStatus(
        experiment=e["key"],
        name=e["name"],
        state=e["state"],
        priority=e["priority"],
        created_at=e["created_at"],
        finished_at=e["finished_at"] or 0,
        shared_workdir=e["shared_workdir"],
        smoke=e["smoke"],
        owner=e["owner"] or "",
        stages=[_stage(s, processes.get(s["name"], 1), nodes.get(s["name"], 1)) for s in e["stages"]],
    )


def _stage(s: dict[str, Any], processes: int, nodes: int) -> infra_pb2.StageStatus:
    return infra_pb2.StageStatus(
        stage_id=s["id"],
        name=s["name"],
        kind=s["kind"],
        state=_state(s["state"]),
        after=s["after"],
        resources=infra_pb2.Resources(
            gpus=s["gpus"], cpus=s["cpus"], memory_mib=s["memory_mib"], processes=processes, nodes=nodes
        ),
        reason=s["reason"],
        max_retries=s["max_retries"],
        attempts=[
            infra_pb2.AttemptStatus(
                attempt_id=a["id"],
                number=a["number"],
                node_id=a["node_id"],
                node_name=a["node_name"],
                state=_state(a["state"]),
                exit_code=a["exit_code"] or 0,
                message=a["message"],
                gpu_indices=a["gpu_indices"],
                assigned_at=a["assigned_at"],
                started_at=a["started_at"] or 0,
                finished_at=a["finished_at"] or 0,
                failure_class=a.get("failure_class") or "",
                rank=a.get("rank") or 0,
            )
            for a in s["attempt_rows"]
        ],
        transitions=[
            infra_pb2.Transition(
                from_state=_state(t["from_state"]), to_state=_state(t["to_state"]), time=t["time"], reason=t["reason"]
            )
            for t in s["transitions"]
        ],
    )
