"""The node protocol in messages: what the servicers (and nothing else) use to talk to the controller.

The controller's parts take and return plain values and the runtime objects of ``master/state.py``;
here requests become those values, commands (:class:`~master.state.AttemptRt` to run,
:class:`~master.state.Stop`) become ``NodeCommand`` messages, and events become rows. :class:`NodeAPI`
is the node service without gRPC: the servicer maps its exceptions to status codes, and tests drive a
controller through it as a node would.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from google.protobuf.json_format import MessageToDict

from infra.master.artifacts import Piece
from infra.master.intake import StatusReport
from infra.master.state import AttemptRt, Command, Fetch, Stop
from infra.protos import PROTOCOL_VERSION, infra_pb2

if TYPE_CHECKING:
    from infra.master.controller import Controller

log = logging.getLogger("infra.master")
STATE_NAMES = {v: k.lower() for k, v in infra_pb2.StageState.items() if v}
# failure classes as nodes report them; an older node's UNSPECIFIED (or ERROR) on FAILED is the stage's own error
FAILURE_CLASSES = {
    infra_pb2.FAILURE_NODE_LOST: "node_lost",
    infra_pb2.FAILURE_PREEMPTED: "preempted",
    infra_pb2.FAILURE_CANCELLED: "cancelled",
    infra_pb2.FAILURE_INFRA: "infra",
}


class ProtocolMismatch(Exception):
    pass


class NodeAPI:
    def __init__(self, controller: Controller) -> None:
        self.c = controller

    async def register(self, req: infra_pb2.RegisterRequest) -> infra_pb2.RegisterResponse:
        if req.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"protocol version mismatch: the node speaks infra.v1 protocol {req.protocol_version}, "
                f"this master speaks {PROTOCOL_VERSION}; run the same infra release on both"
            )
        facts = MessageToDict(req.facts, preserving_proto_field_name=True)
        running = [(r.attempt_id, r.lease_token) for r in req.running]
        node = await self.c.registry.register(req.node_id, req.protocol_version, facts, running)
        return infra_pb2.RegisterResponse(
            protocol_version=PROTOCOL_VERSION,
            node_id=node.id,
            session=node.session,
            heartbeat_interval_s=self.c.registry.heartbeat_interval,
            lost_timeout_s=self.c.registry.lost_timeout,
        )

    def heartbeat(self, req: infra_pb2.HeartbeatRequest) -> infra_pb2.HeartbeatResponse:
        running = [(r.attempt_id, r.lease_token) for r in req.running]
        beat = self.c.registry.heartbeat(
            req.node_id, req.session, usage=req.usage, running=running, unavailable=req.unavailable
        )
        if beat.reregister:
            return infra_pb2.HeartbeatResponse(reregister=True, seq=req.seq)
        return infra_pb2.HeartbeatResponse(revoked=beat.revoked, seq=req.seq)

    async def assignments(self, node_id: str, session: int) -> AsyncIterator[infra_pb2.NodeCommand]:
        async for command in self.c.registry.commands(node_id, session):
            yield node_command(command)

    async def report_status(self, rep: infra_pb2.StageStatusReport) -> tuple[bool, str]:
        state = STATE_NAMES.get(rep.state, "")
        report = StatusReport(
            node_id=rep.node_id,
            attempt_id=rep.attempt_id,
            lease=rep.lease_token,
            state=state or str(rep.state),
            exit_code=rep.exit_code,
            message=rep.message,
            failure_class=FAILURE_CLASSES.get(rep.failure_class, "") if state == "failed" else "",
        )
        return await self.c.intake.report_status(report)

    async def upload(self, messages: AsyncIterator[infra_pb2.ArtifactChunk]) -> infra_pb2.UploadAck:
        accepted, reason = await self.c.artifacts.receive(pieces(messages))
        return infra_pb2.UploadAck(accepted=accepted, reason=reason)

    async def report_events(self, batch: infra_pb2.EventBatch) -> tuple[int, list[int]]:
        node_id = batch.node_id
        result = await self.c.intake.report_events(
            node_id,
            list(batch.events),
            lease_of=lambda ev: (ev.attempt_id, ev.lease_token),
            rows=lambda accepted: event_rows(node_id, accepted),
        )
        for ev in batch.events:  # in order: the last of a batch wins
            if ev.WhichOneof("body") == "progress":
                p = ev.progress
                total = p.total if p.has_total else None
                self.c.intake.progress(node_id, ev.attempt_id, ev.lease_token, p.what, p.done, total)
        return result


def usage_row(usage: infra_pb2.Usage) -> dict[str, Any]:
    """A heartbeat's usage as stored (run in the writer thread: too slow for the loop for 1,000 nodes)."""
    return MessageToDict(usage, preserving_proto_field_name=True)


def node_command(command: Command) -> infra_pb2.NodeCommand:
    if isinstance(command, Stop):
        return cancel_command(command)
    if isinstance(command, Fetch):
        return infra_pb2.NodeCommand(
            fetch=infra_pb2.FetchArtifact(
                transfer_id=command.transfer_id,
                experiment=command.experiment,
                path=command.path,
                offset=command.offset,
                max_bytes=command.max_bytes,
                stat=command.stat,
            )
        )
    return assignment(command)


async def pieces(messages: AsyncIterator[infra_pb2.ArtifactChunk]) -> AsyncIterator[Piece]:
    """An upload's messages as the relay's plain values."""
    async for m in messages:
        yield Piece(
            node_id=m.node_id,
            session=m.session,
            transfer_id=m.transfer_id,
            offset=m.offset,
            data=m.data,
            size=m.size,
            last=m.last,
            sha256=m.sha256,
            error=m.error,
            error_kind=m.error_kind,
        )


def assignment(att: AttemptRt) -> infra_pb2.NodeCommand:
    st = att.stage
    r = st.resources
    return infra_pb2.NodeCommand(
        assign=infra_pb2.Assignment(
            attempt_id=att.id,
            lease_token=att.lease,
            attempt=att.number,
            stage_id=st.id,
            experiment=st.exp.key,
            stage=st.name,
            kind=st.kind,
            params_json=json.dumps(st.params),
            smoke=st.exp.smoke,
            resources=infra_pb2.Resources(
                gpus=r.gpus, cpus=r.cpus, memory_mib=r.memory_mib, processes=r.processes, nodes=r.nodes
            ),
            gpu_indices=list(att.gpus),
            plan_json=st.exp.plan_json,
            rendezvous=_rendezvous(att),
        )
    )


def _rendezvous(att: AttemptRt) -> infra_pb2.Rendezvous | None:
    z = att.rendezvous
    if z is None:
        return None
    return infra_pb2.Rendezvous(endpoint=z.endpoint, nnodes=z.nnodes, node_rank=z.node_rank, run_id=z.run_id)


def cancel_command(stop: Stop) -> infra_pb2.NodeCommand:
    return infra_pb2.NodeCommand(
        cancel=infra_pb2.CancelAttempt(attempt_id=stop.attempt_id, lease_token=stop.lease, reason=stop.reason)
    )


def event_rows(node_id: str, events: list[infra_pb2.Event]) -> list[dict[str, Any]]:
    rows = []
    for ev in events:
        if ev.WhichOneof("body") == "artifact" and not _inside(ev.artifact.path):
            log.warning("node %s sent artifact path %r outside its workdir; dropped", node_id, ev.artifact.path)
            ev = _as_log(ev, f"artifact rejected by the master: {ev.artifact.path!r} is outside the workdir")
        row = {"attempt_id": ev.attempt_id, "seq": ev.seq, "time": ev.time, "data": event_data(ev)}
        rows.append({**row, "type": ev.WhichOneof("body") or "log"})
    return rows


def _inside(path: str) -> bool:
    """An artifact path must be relative to the node's workdir and stay in it (checked on the node too)."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path


def _as_log(ev: infra_pb2.Event, text: str) -> infra_pb2.Event:
    out = infra_pb2.Event(attempt_id=ev.attempt_id, lease_token=ev.lease_token, seq=ev.seq, time=ev.time)
    out.log.stream, out.log.text = "agent", text
    return out


def event_data(ev: infra_pb2.Event) -> dict[str, Any]:
    body = ev.WhichOneof("body")
    if body == "metric":
        values: dict[str, float | None] = dict(ev.metric.values)
        values.update(dict.fromkeys(ev.metric.null_values))
        return {"step": ev.metric.step, "values": values}
    if body == "artifact":
        return {"path": ev.artifact.path, "kind": ev.artifact.kind}
    if body == "progress":
        p = ev.progress
        return {"what": p.what, "done": p.done, "total": p.total if p.has_total else None}
    if body == "dropped":
        d = ev.dropped
        return {
            "count": d.count,
            "logs": d.logs,
            "metrics": d.metrics,
            "progress": d.progress,
            "first_seq": d.first_seq,
            "last_seq": d.last_seq,
            "reason": d.reason,
        }
    return {"stream": ev.log.stream, "text": ev.log.text}
