"""The control plane: plans and stage kinds, the ``infra`` CLI, the client; master and node live beside it.

Nothing here imports torch (or anything heavy): the master runs on a small CPU machine, and each CLI
verb imports the master, node or client code it needs only when it runs.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("infra")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
