"""A node's persistent identity: ``<workdir>/nodes/<name>.json``, created on first start; its state
directory ``<workdir>/nodes/<name>.d/`` beside it.

Keyed by the node's name so that several agents may share one workdir (e.g. on a shared file system)
and still keep distinct identities; restarting an agent under the same name keeps its id.
"""

from __future__ import annotations

import json
import re
import socket
import time
import uuid
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def default_name() -> str:
    return socket.gethostname() or "node"


def state_dir(workdir: Path, name: str) -> Path:
    """Where the agent of this name keeps what must survive its restart (assignments, event spool)."""
    return workdir / "nodes" / f"{_SAFE.sub('_', name)}.d"


def node_id(workdir: Path, name: str) -> str:
    path = workdir / "nodes" / f"{_SAFE.sub('_', name)}.json"
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["id"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"{path} is damaged ({e}); delete it to give this node a new identity") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    ident = {"id": str(uuid.uuid4()), "name": name, "created": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ident, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return ident["id"]
