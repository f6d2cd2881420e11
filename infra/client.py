"""The client side of ``ClientService``: calls the master and returns plain, JSON-ready dicts.

The master address comes from ``--master``, else ``$INFRA_MASTER``, else ``127.0.0.1:50051``; the
token from ``--token-file``, else ``$INFRA_TOKEN``, else ``<config dir>/token``; TLS from ``--tls-ca``
(and ``--tls-cert/--tls-key`` for mutual TLS), else ``$INFRA_TLS_*`` (see ``infra/transport.py``).
Stage references are ``EXPERIMENT/STAGE`` (e.g. ``demo-3/train``) or a numeric stage id.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from infra.protos import MAX_MESSAGE_BYTES, infra_pb2, infra_pb2_grpc
from infra.protos.transport import ClientTls, Connection, TransportError, read_token
from infra.spec.plan import Issue, PlanError

DEFAULT_MASTER = "127.0.0.1:50051"
TERMINAL = ("succeeded", "failed", "cancelled")
METRICS_PAGE = 5_000  # metric records per GetMetrics call (the master caps pages at 10,000)


class ClientError(RuntimeError):
    pass


def master_address(arg: str | None = None) -> str:
    return arg or os.environ.get("INFRA_MASTER") or DEFAULT_MASTER


def user_token(token_file: str | None = None) -> str | None:
    from infra.spec.workdir import config_dir

    return read_token(token_file, "INFRA_TOKEN", config_dir() / "token")


def parse_stage_ref(text: str) -> infra_pb2.StageRef:
    if text.isdigit():
        return infra_pb2.StageRef(stage_id=int(text))
    exp, sep, stage = text.rpartition("/")
    if not sep or not exp or not stage:
        raise ClientError(f"stage {text!r}: expected EXPERIMENT/STAGE (e.g. demo-3/train) or a numeric stage id")
    return infra_pb2.StageRef(experiment=exp, stage=stage)


def _state(value: int) -> str:
    return infra_pb2.StageState.Name(value).lower() if value else ""


def _dict(msg: Any) -> dict[str, Any]:
    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def node_dict(n: infra_pb2.NodeStatus) -> dict[str, Any]:
    facts = _dict(n.facts)
    return {
        "id": n.node_id,
        "online": n.online,
        "state": n.state,
        "unavailable": n.unavailable or None,
        "drained": n.drained,
        "drain_deadline": n.drain_deadline or None,
        "heartbeat_age_s": round(n.heartbeat_age_s, 3) if n.heartbeat_age_s >= 0 else None,
        **facts,
        "usage": _dict(n.usage) if n.HasField("usage") else None,
        "allocated": {  # what the node's attempts hold (a stage's processes are not a node resource)
            "gpus": n.allocated.gpus,
            "cpus": n.allocated.cpus,
            "memory_mib": n.allocated.memory_mib,
            "gpu_indices": list(n.allocated_gpus),
        },
    }


def stage_dict(s: infra_pb2.StageStatus) -> dict[str, Any]:
    attempts = [
        {
            "attempt_id": a.attempt_id,
            "number": a.number,
            "node_id": a.node_id,
            "node": a.node_name,
            "state": _state(a.state),
            "exit_code": a.exit_code,
            "message": a.message,
            "gpu_indices": list(a.gpu_indices),
            "assigned_at": a.assigned_at,
            "started_at": a.started_at or None,
            "finished_at": a.finished_at or None,
            "failure_class": a.failure_class or None,
            "rank": a.rank,
        }
        for a in s.attempts
    ]
    latest = [a for a in attempts if attempts and a["number"] == attempts[-1]["number"]]  # a gang's members
    return {
        "stage_id": s.stage_id,
        "name": s.name,
        "kind": s.kind,
        "state": _state(s.state),
        "after": list(s.after),
        "resources": _dict(s.resources),
        "max_retries": s.max_retries,
        "reason": s.reason,
        "node": ", ".join(a["node"] for a in latest) or None,
        "progress": [{"what": p.what, "done": p.done, "total": p.total if p.has_total else None} for p in s.progress],
        "attempts": attempts,
        "transitions": [
            {"from": _state(t.from_state), "to": _state(t.to_state), "time": t.time, "reason": t.reason}
            for t in s.transitions
        ],
    }


def experiment_dict(e: infra_pb2.ExperimentStatus) -> dict[str, Any]:
    return {
        "experiment": e.experiment,
        "name": e.name,
        "state": e.state,
        "priority": e.priority,
        "smoke": e.smoke,
        "shared_workdir": e.shared_workdir,
        "created_at": e.created_at,
        "finished_at": e.finished_at or None,
        "owner": e.owner or None,
        "stages": [stage_dict(s) for s in e.stages],
    }


def token_dict(t: infra_pb2.TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "user": t.user, "role": t.role, "created_at": t.created_at, "revoked": t.revoked}


class Client:
    def __init__(
        self,
        address: str | None = None,
        timeout: float = 30.0,
        token: str | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        self.address = master_address(address)
        self.timeout = timeout
        try:
            self.conn = Connection(self.address, token, tls)
        except TransportError as e:
            raise ClientError(str(e)) from None
        self.stub = infra_pb2_grpc.ClientServiceStub(self.conn.channel)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, **kw: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=kw.pop("timeout", self.timeout), **kw)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> ClientError:
        code, details = e.code(), e.details() or ""
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return ClientError(
                f"cannot reach the master at {self.address} ({code.name.lower()}"
                + (f": {details}" if details else "")
                + "): is `infra master` running, and do TLS settings match? "
                "Give its address with --master HOST:PORT or $INFRA_MASTER."
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ClientError(f"message too large for the master (limit {MAX_MESSAGE_BYTES >> 20} MiB): {details}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return ClientError(f"{code.name.lower().replace('_', ' ')}: {details}")
        return ClientError(details or code.name)

    def submit(self, plan: Any) -> str:
        resp = self._call("Submit", infra_pb2.SubmitRequest(plan_json=json.dumps(plan)))
        if resp.errors:
            raise PlanError([Issue(e.path, e.message) for e in resp.errors])
        return resp.experiment

    def status(self, experiment: str | None = None, limit: int = 0) -> dict[str, Any]:
        resp = self._call("GetStatus", infra_pb2.StatusRequest(experiment=experiment or "", limit=limit))
        return {
            "nodes": [node_dict(n) for n in resp.nodes],
            "experiments": [experiment_dict(e) for e in resp.experiments],
        }

    def experiment(self, key: str) -> dict[str, Any]:
        return self.status(key)["experiments"][0]

    def logs(self, stage: str, follow: bool = False, attempt: int = 0, member: int = 0) -> Iterator[dict[str, Any]]:
        req = infra_pb2.LogsRequest(stage=parse_stage_ref(stage), follow=follow, attempt=attempt, member=member)
        try:
            for r in self.stub.GetLogs(req, timeout=None if follow else self.timeout):
                yield {"attempt": r.attempt, "seq": r.seq, "time": r.time, "stream": r.stream, "text": r.text}
        except grpc.RpcError as e:
            raise self._error(e) from None

    def metrics(self, stage: str, attempt: int = 0, member: int = 0) -> list[dict[str, Any]]:
        """Every metric record of one member (a gang's rank; 0 for a plain stage), asked for a page at a time
        (keyset cursor: the last record's attempt and seq)."""
        ref, out = parse_stage_ref(stage), []
        after_attempt = after_seq = 0
        while True:
            req = infra_pb2.MetricsRequest(
                stage=ref,
                attempt=attempt,
                page_size=METRICS_PAGE,
                after_attempt=after_attempt,
                after_seq=after_seq,
                member=member,
            )
            resp = self._call("GetMetrics", req)
            for r in resp.metrics:
                values: dict[str, float | None] = dict(r.metric.values)
                values.update(dict.fromkeys(r.metric.null_values))
                out.append(
                    {"attempt": r.attempt, "seq": r.seq, "time": r.time, "step": r.metric.step, "values": values}
                )
            if not resp.more or not resp.metrics:
                return out
            after_attempt, after_seq = resp.metrics[-1].attempt, resp.metrics[-1].seq

    def artifacts(self, experiment: str) -> list[dict[str, Any]]:
        resp = self._call("ListArtifacts", infra_pb2.ArtifactsRequest(experiment=experiment))
        return [
            {
                "stage": a.stage,
                "attempt": a.attempt,
                "node_id": a.node_id,
                "node": a.node_name,
                "time": a.time,
                "path": a.artifact.path,
                "kind": a.artifact.kind,
            }
            for a in resp.artifacts
        ]

    def fetch_artifact(
        self,
        experiment: str,
        path: str,
        out: Path,
        offset: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Copy a file of the experiment's record to ``out``, through the master, and check its sha256.

        Resumable: without ``offset`` an existing ``out`` is taken as the part already fetched (its size is
        the offset); with ``offset``, ``out`` is cut there. The sha256 the node sends covers the whole file, so
        the check also covers the part fetched earlier. ``on_progress(bytes so far, size)`` after each chunk."""
        existed = out.exists()
        have = out.stat().st_size if existed else 0
        start = have if offset is None else offset
        if start > have:
            raise ClientError(f"--offset {start} is beyond the end of {out} ({have} bytes fetched so far)")
        try:
            return self._fetch_into(experiment, path, out, start, on_progress)
        except ClientError:
            if not existed and out.exists() and out.stat().st_size == 0:
                out.unlink()  # nothing came: leave no empty file behind
            raise

    def _fetch_into(
        self, experiment: str, path: str, out: Path, start: int, on_progress: Callable[[int, int], None] | None
    ) -> dict[str, Any]:
        digest = hashlib.sha256()
        with out.open("r+b" if out.exists() else "w+b") as fh:
            fh.truncate(start)
            while block := fh.read(1 << 22):
                digest.update(block)
            req = infra_pb2.GetArtifactRequest(experiment=experiment, path=path, offset=start)
            pos, size, sha, node = start, 0, "", ""
            try:
                for m in self.stub.GetArtifact(req, timeout=None):
                    node = node or m.node_id
                    size = m.size
                    if m.data:
                        if m.offset != pos:
                            raise ClientError(f"{path}: chunk at offset {m.offset}, expected {pos}")
                        fh.write(m.data)
                        digest.update(m.data)
                        pos += len(m.data)
                    if on_progress is not None:
                        on_progress(pos, size)
                    if m.last:
                        sha = m.sha256
            except grpc.RpcError as e:
                raise self._error(e) from None
        if not sha or pos != size:
            raise ClientError(f"{path}: the transfer ended at byte {pos} of {size}; run again to resume")
        if digest.hexdigest() != sha:
            raise ClientError(
                f"{out}: sha256 differs from {path} on the node (the part fetched earlier is of another version "
                "of the file?); delete it and fetch again"
            )
        return {
            "experiment": experiment,
            "path": path,
            "file": str(out),
            "bytes": size,
            "fetched": pos - start,
            "resumed_from": start,
            "sha256": sha,
            "node_id": node,
        }

    def cancel(self, experiment: str, reason: str = "") -> dict[str, Any]:
        resp = self._call("Cancel", infra_pb2.CancelRequest(experiment=experiment, reason=reason))
        return {
            "experiment": experiment,
            "cancelled": resp.cancelled,
            "signalled": resp.signalled,
            "finished": resp.finished or None,
        }

    def drain_node(self, node: str, undrain: bool = False, deadline_s: float = 0.0) -> dict[str, Any]:
        req = infra_pb2.DrainNodeRequest(node=node, undrain=undrain, deadline_s=deadline_s)
        resp = self._call("DrainNode", req)
        return {**node_dict(resp.node), "running": resp.running}

    def rerun(self, experiment: str, stage: str = "") -> list[str]:
        return list(self._call("Rerun", infra_pb2.RerunRequest(experiment=experiment, stage=stage)).stages)

    def create_token(self, user: str, role: str) -> dict[str, Any]:
        resp = self._call("CreateToken", infra_pb2.CreateTokenRequest(user=user, role=role))
        return {**token_dict(resp.info), "token": resp.token}

    def list_tokens(self) -> list[dict[str, Any]]:
        return [token_dict(t) for t in self._call("ListTokens", infra_pb2.ListTokensRequest()).tokens]

    def revoke_token(self, token_id: int) -> bool:
        return self._call("RevokeToken", infra_pb2.RevokeTokenRequest(id=token_id)).revoked

    def wait(
        self, experiment: str, timeout: float | None = None, poll: float = 1.0, on_change: Any = None
    ) -> dict[str, Any]:
        """Poll until the experiment finishes; ``on_change(exp)`` is called whenever a stage state changes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: tuple[str, ...] = ()
        while True:
            exp = self.experiment(experiment)
            states = tuple(s["state"] for s in exp["stages"])
            if on_change is not None and states != last:
                on_change(exp)
            last = states
            if exp["state"] in TERMINAL:
                return exp
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"experiment {experiment} still {exp['state']} after {timeout:.0f}s")
            time.sleep(poll)
