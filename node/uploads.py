"""Sending a file of an experiment record to the master, which relays it to a client (``infra artifacts --get``).

The master asks over the node's command stream (``FetchArtifact``); the node answers with one
client-streaming ``UploadArtifact`` call, so it still opens every connection itself. The path is confined
to the experiment's directory by the layout's own check (:meth:`crystallm_core.layout.ExperimentLayout.file`):
no absolute path, no ``..``, no link leading outside. The size is read once when the file is opened and
exactly that many bytes are sent, so a file still growing is sent as it was then; the sha256 covers those
bytes from the start of the file (a resumed transfer hashes the part the client already has without
sending it), so the client checks its whole copy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from crystallm_core.layout import ExperimentLayout, LayoutError, experiment_dir
from infra.protos import infra_pb2

CHUNK_BYTES = 1 << 20  # per message: well under the message limit, small enough for the master's bounded buffer


def _open(workdir: Path, f: infra_pb2.FetchArtifact) -> tuple[BinaryIO | None, str, str]:
    """The open file, or (None, why not, error kind)."""
    try:
        root = experiment_dir(workdir, f.experiment)
        if not root.is_dir():
            return None, f"this node has no directory for experiment {f.experiment}", "not_found"
        return ExperimentLayout(root).file(f.path).open("rb"), "", ""
    except LayoutError as e:
        return None, str(e), "invalid"
    except FileNotFoundError as e:
        return None, str(e), "not_found"
    except OSError as e:
        return None, f"cannot read {f.path}: {e.strerror}", "not_found"


def upload_messages(
    workdir: Path, f: infra_pb2.FetchArtifact, node_id: str, session: int, chunk: int = CHUNK_BYTES
) -> Iterator[infra_pb2.ArtifactChunk]:
    """The messages of one upload: an error alone; or the size (``stat``); or the data from ``f.offset`` in
    chunks, then a last message with the sha256 of the whole file."""
    head = {"node_id": node_id, "session": session, "transfer_id": f.transfer_id}
    fh, error, kind = _open(workdir, f)
    if fh is None:
        yield infra_pb2.ArtifactChunk(**head, error=error, error_kind=kind)
        return
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if f.max_bytes and size > f.max_bytes:
            error, kind = f"{f.path} is {size} bytes, over the master's limit of {f.max_bytes} bytes", "too_large"
        elif f.offset > size:
            error, kind = f"offset {f.offset} is beyond the end of {f.path} ({size} bytes)", "invalid"
        if error:
            yield infra_pb2.ArtifactChunk(**head, error=error, error_kind=kind)
            return
        if f.stat:
            yield infra_pb2.ArtifactChunk(**head, size=size, last=True)
            return
        digest = hashlib.sha256()
        left = f.offset
        while left:  # the part the client has: hashed, not sent
            block = fh.read(min(4 * chunk, left))
            if not block:
                break
            digest.update(block)
            left -= len(block)
        offset = f.offset
        yield infra_pb2.ArtifactChunk(**head, offset=offset, size=size)
        while offset < size:
            block = fh.read(min(chunk, size - offset))
            if not block:  # truncated while being sent: the client's sha256 check fails loudly
                break
            digest.update(block)
            yield infra_pb2.ArtifactChunk(transfer_id=f.transfer_id, offset=offset, data=block, size=size)
            offset += len(block)
        yield infra_pb2.ArtifactChunk(
            transfer_id=f.transfer_id, offset=offset, size=size, last=True, sha256=digest.hexdigest()
        )
