"""Stage-kind plugins of a node (and of ``infra-train``): modules that call ``infra.spec.stages.register_stage``.

They come from ``$INFRA_STAGE_MODULES`` (comma-separated module names or ``.py`` paths) and from the workdir's
``plugins/stage/*.py``, and load through the one isolated plugin loader (``crystallm_core.plugins.load_modules``,
standard library only): each is first imported in a child interpreter within the time limit, so a plugin that
raises, exits or hangs is reported and skipped and never wedges the agent; then it is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from crystallm_core.layout import PLUGINS
from crystallm_core.plugins import DEFAULT_TIMEOUT, load_modules

MODULES_ENV = "INFRA_STAGE_MODULES"
PLUGIN_FOLDER = (PLUGINS, "stage")  # <workdir>/plugins/stage/*.py: a node's own stage kinds
FILE_PREFIX = "infra_stage_plugin"  # a plugin file is imported as infra_stage_plugin_<stem>
PRELOAD = ("infra.spec.stages",)  # what every stage plugin imports, not charged to the first one's time limit


def workdir_stage_plugins(workdir: Path) -> list[str]:
    """The stage-kind plugin files of a node's workdir, ``<workdir>/plugins/stage/*.py``, in name order."""
    folder = workdir.joinpath(*PLUGIN_FOLDER)
    return [str(p) for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"] if folder.is_dir() else []


def load_stage_modules(
    spec: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    problems: list[str] | None = None,
    files: Sequence[str] = (),
) -> list[str]:
    """Import plugin modules that register stage kinds: ``$INFRA_STAGE_MODULES`` (or ``spec``) is a
    comma-separated list of importable module names or ``.py`` file paths, followed by ``files`` (a
    workdir's plugin files, :func:`workdir_stage_plugins`), each given ``timeout`` seconds. Returns what
    was loaded. A module that fails or hangs raises ImportError, unless ``problems`` is given: then the
    message is appended there and the other modules still load (how a node starts anyway)."""
    spec = os.environ.get(MODULES_ENV, "") if spec is None else spec
    items = [*filter(None, (s.strip() for s in spec.split(","))), *files]
    loaded, failed = load_modules(items, timeout, preload=PRELOAD, prefix=FILE_PREFIX)
    messages = [
        f"stage plugin {f.source} did not finish importing within {timeout:g}s (does it hang?)"
        if f.hung
        else f"stage plugin {f.source} failed to import: {f.error}"
        for f in failed
    ]
    if messages and problems is None:
        raise ImportError("; ".join(messages))
    if problems is not None:
        problems.extend(messages)
    return loaded
