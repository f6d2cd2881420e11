"""Relaying a file of an experiment record from the node that holds it to a client.

Nodes have no inbound port, so the master asks over the node's command stream (a :class:`~master.state.Fetch`)
and the node answers with one ``UploadArtifact`` call of chunks (``node/uploads.py``). The relay hands each
chunk to the client through a queue of :data:`BUFFER_CHUNKS` chunks: while the client does not read, the
upload handler does not either, and gRPC's flow control holds the node back, so the master never holds more
than a few chunks of a file. A client that goes away ends the upload (its handler answers at once).

Who may read what is decided here, like the other verbs: a user reads only their own experiments. Which node
is asked: the one that reported the path as an artifact, else the experiment's home node, else the node of
its latest attempt; for a ``shared_workdir`` experiment, any online node that has the file (tried in that
order, then the others). :class:`ArtifactRelay` is the whole interface (the gRPC servicer and the web
dashboard's downloads use it); its errors are :class:`ArtifactError` with a message for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import Engine

from infra.master import store
from infra.master.auth import Identity
from infra.master.state import ClusterState, Fetch, NodeRt

log = logging.getLogger("infra.master")
BUFFER_CHUNKS = 4  # chunks (1 MiB each from nodes) held per transfer at most
ANSWER_TIMEOUT_S = 30.0  # for the node's first message
STALL_TIMEOUT_S = 60.0  # between two messages of an upload
EXPERIMENTS = "experiments"  # the workdir folder of records: ListArtifacts paths begin experiments/KEY/


class ArtifactError(Exception):
    """A file that cannot be relayed. ``kind``: invalid | not_found | denied | offline | too_large | busy |
    failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, kw_only=True)
class Piece:
    """One message of an upload, as plain values (``master/wire.py`` converts). The first names the node,
    its session and the transfer."""

    transfer_id: int
    node_id: str = ""
    session: int = 0
    offset: int = 0
    data: bytes = b""
    size: int = 0
    last: bool = False
    sha256: str = ""
    error: str = ""
    error_kind: str = ""


@dataclass(eq=False)
class _Transfer:
    id: int
    node: NodeRt
    queue: asyncio.Queue[Piece] = field(default_factory=lambda: asyncio.Queue(BUFFER_CHUNKS))
    closed: bool = False  # the client is done (or gone): the upload handler stops
    ended: str = ""  # the upload stopped before its last message: why


def record_path(key: str, path: str) -> str:
    """``path`` relative to the experiment directory: as ListArtifacts shows it (``experiments/KEY/...``,
    relative to the node's workdir) or already relative to the record. Absolute paths and ``..`` are refused
    here; the node checks again, resolving links."""
    prefix = f"{EXPERIMENTS}/{key}/"
    rel = path[len(prefix) :] if path.startswith(prefix) else path
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or "\0" in rel or rel in (".", "./"):
        raise ArtifactError("invalid", f"path {path!r} must be relative to the experiment directory, without '..'")
    return p.as_posix()


class ArtifactRelay:
    def __init__(
        self,
        state: ClusterState,
        *,
        engine: Engine,
        read: Callable[..., Awaitable[Any]],
        node_state: Callable[[NodeRt], str],
        max_bytes: int,
    ) -> None:
        self.state = state
        self.engine = engine
        self.read = read
        self.node_state = node_state  # online | offline | lost
        self.max_bytes = max_bytes
        self.answer_timeout = ANSWER_TIMEOUT_S
        self.stall_timeout = STALL_TIMEOUT_S
        self._ids = itertools.count(1)
        self.transfers: dict[int, _Transfer] = {}

    # --- the interface -----------------------------------------------------------------------------

    async def stat(self, exp_key: str, path: str, *, user: Identity) -> int:
        """The file's size in bytes."""
        async with contextlib.aclosing(self.pieces(exp_key, path, 0, user=user, stat=True)) as answer:
            async for piece in answer:
                return piece.size
        raise ArtifactError("failed", f"{exp_key}: no answer for {path}")

    async def stream(self, exp_key: str, path: str, offset: int = 0, *, user: Identity) -> AsyncIterator[bytes]:
        """The file's bytes from ``offset`` on, in chunks, as the node sends them."""
        async with contextlib.aclosing(self.pieces(exp_key, path, offset, user=user)) as answer:
            async for piece in answer:
                if piece.data:
                    yield piece.data

    async def pieces(
        self, exp_key: str, path: str, offset: int = 0, *, user: Identity, stat: bool = False
    ) -> AsyncIterator[Piece]:
        """Every message of the node's answer (the first has the size, the last the sha256 of the whole
        file): what a client that checks its copy needs."""
        if offset < 0:
            raise ArtifactError("invalid", f"offset {offset} must be 0 or more")
        rel = record_path(exp_key, path)
        nodes, shared = await self._holders(exp_key, f"{EXPERIMENTS}/{exp_key}/{rel}", user)
        misses: list[str] = []
        for node in nodes:
            if node.queue is None:  # its stream closed while an earlier node was asked
                misses.append(f"{node.name}: {self.node_state(node)}")
                continue
            t = self._ask(node, exp_key, rel, offset, stat)
            try:
                first = await self._next(t, self.answer_timeout, exp_key, rel)
                if first.error:
                    if shared and first.error_kind == "not_found":
                        misses.append(f"{node.name}: {first.error}")
                        continue  # another node of the shared workdir may have it
                    raise ArtifactError(first.error_kind or "failed", f"{exp_key}: node {node.name}: {first.error}")
                yield first
                piece = first
                while not piece.last:
                    await asyncio.sleep(0)  # a turn for every other call between two chunks (heartbeats)
                    piece = await self._next(t, self.stall_timeout, exp_key, rel)
                    if piece.error:
                        raise ArtifactError(piece.error_kind or "failed", f"{exp_key}: node {node.name}: {piece.error}")
                    yield piece
                return
            finally:
                self._close(t)
        raise ArtifactError("not_found", f"{exp_key}: no online node has {rel} ({'; '.join(misses) or 'none online'})")

    # --- the node's side ---------------------------------------------------------------------------

    async def receive(self, pieces: AsyncIterator[Piece]) -> tuple[bool, str]:
        """Take one upload (the ``UploadArtifact`` handler): hand its messages to the waiting client, at the
        client's pace. (accepted, why not)."""
        t: _Transfer | None = None
        done = False
        try:
            async for p in pieces:
                if t is None:
                    t = self.transfers.get(p.transfer_id)
                    if t is None or t.node.id != p.node_id or t.node.session != p.session:
                        return False, "no client waits for this transfer (it went away, or the session changed)"
                if t.closed:
                    return False, "the client went away"
                await t.queue.put(p)  # bounded: waits while the client does not read
                if t.closed:
                    return False, "the client went away"
                if p.last or p.error:
                    done = True
                    return True, ""
            return False, "the upload ended before its last message"
        except Exception as e:  # the node's call broke (it went away): tell the client, not only the log
            if t is not None:
                t.ended = f"node {t.node.name} stopped sending: {type(e).__name__}"
            raise
        finally:
            if t is not None and not done and not t.ended:
                t.ended = f"node {t.node.name} stopped sending before the end of the file"

    # --- internals ---------------------------------------------------------------------------------

    async def _holders(self, key: str, reported: str, user: Identity) -> tuple[list[NodeRt], bool]:
        """The nodes to ask, in order, and whether the workdir is shared; the access check is here."""
        info = await self.read(store.artifact_holders, self.engine, key, reported)
        if info is None:
            raise ArtifactError("not_found", f"no experiment {key!r}")
        if not user.admin and info["owner"] != user.user:
            raise ArtifactError(
                "denied",
                f"experiment {key!r} belongs to {info['owner'] or 'nobody'!r}; user {user.user!r} may only access "
                "their own",
            )
        known = [self.state.nodes[n] for n in info["nodes"] if n in self.state.nodes]
        rel = reported.split("/", 2)[2]
        if not info["shared_workdir"]:
            if not known:
                raise ArtifactError("not_found", f"{key}: no node holds its files yet (no stage has run)")
            node = known[0]
            state = self.node_state(node)
            if state != "online":
                raise ArtifactError("offline", f"{key}: node {node.name} holding {rel} is {state}")
            return [node], False
        others = sorted((n for n in self.state.nodes.values() if n not in known), key=lambda n: n.name)
        online = [n for n in [*known, *others] if self.node_state(n) == "online"]
        if not online:
            raise ArtifactError("offline", f"{key}: no node is online to read {rel} from the shared workdir")
        return online, True

    def _ask(self, node: NodeRt, key: str, rel: str, offset: int, stat: bool) -> _Transfer:
        assert node.queue is not None  # checked by the caller, with no await since
        t = _Transfer(next(self._ids), node)
        self.transfers[t.id] = t
        node.queue.put_nowait(
            Fetch(transfer_id=t.id, experiment=key, path=rel, offset=offset, max_bytes=self.max_bytes, stat=stat)
        )
        return t

    async def _next(self, t: _Transfer, timeout: float, key: str, rel: str) -> Piece:
        """The upload's next message; a silent or broken node is an error naming it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not t.queue.empty():
                return t.queue.get_nowait()
            if t.ended:
                raise ArtifactError("failed", f"{key}: {t.ended} ({rel})")
            left = deadline - loop.time()
            if left <= 0:
                raise ArtifactError(
                    "offline", f"{key}: node {t.node.name} holding {rel} did not answer in {timeout:g}s"
                )
            try:
                return await asyncio.wait_for(t.queue.get(), min(left, 1.0))
            except asyncio.TimeoutError:
                continue

    def _close(self, t: _Transfer) -> None:
        """The client is done or gone: free the queue, so that an upload handler waiting to put wakes and ends."""
        t.closed = True
        self.transfers.pop(t.id, None)
        while not t.queue.empty():
            t.queue.get_nowait()
