"""Stage-kind plugins of a node (and of ``infra-train``): modules that call ``infra.spec.stages.register_stage``.

They come from ``$INFRA_STAGE_MODULES`` (comma-separated module names or ``.py`` paths) and from the workdir's
``plugins/stage/*.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

MODULES_ENV = "INFRA_STAGE_MODULES"
IMPORT_TIMEOUT_S = 30.0
PLUGIN_FOLDER = ("plugins", "stage")  # <workdir>/plugins/stage/*.py: a node's own stage kinds


def _import_one(item: str) -> None:
    if item.endswith(".py"):
        path = Path(item).resolve()
        module_name = f"infra_stage_plugin_{path.stem}"
        if module_name not in sys.modules:
            mspec = importlib.util.spec_from_file_location(module_name, path)
            if mspec is None or mspec.loader is None:
                raise ImportError(f"cannot load {item}")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[module_name] = module
            try:
                mspec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
    else:
        importlib.import_module(item)


def _import_in_time(item: str, timeout: float) -> None:
    """Import one plugin in a helper thread and give up on it after ``timeout``: a module that hangs at
    import (a network call, a lock) must not hang the node. The stuck thread is left behind, harmless."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _import_one(item)
        except BaseException as e:  # reported below, with the module's name
            failure.append(e)

    thread = threading.Thread(target=target, name=f"import {item}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ImportError(f"stage plugin {item} did not finish importing within {timeout:g}s (does it hang?)")
    if failure:
        raise ImportError(f"stage plugin {item} failed to import: {type(failure[0]).__name__}: {failure[0]}")


def workdir_stage_plugins(workdir: Path) -> list[str]:
    """The stage-kind plugin files of a node's workdir, ``<workdir>/plugins/stage/*.py``, in name order."""
    folder = workdir.joinpath(*PLUGIN_FOLDER)
    return [str(p) for p in sorted(folder.glob("*.py")) if p.name != "__init__.py"] if folder.is_dir() else []


def load_stage_modules(
    spec: str | None = None,
    timeout: float = IMPORT_TIMEOUT_S,
    problems: list[str] | None = None,
    files: Sequence[str] = (),
) -> list[str]:
    """Import plugin modules that register stage kinds: ``$INFRA_STAGE_MODULES`` (or ``spec``) is a
    comma-separated list of importable module names or ``.py`` file paths, followed by ``files`` (a
    workdir's plugin files, :func:`workdir_stage_plugins`), each given ``timeout`` seconds. Returns what
    was loaded. A module that fails or hangs raises ImportError, unless ``problems`` is given: then the
    message is appended there and the other modules still load (how a node starts anyway)."""
    spec = os.environ.get(MODULES_ENV, "") if spec is None else spec
    loaded = []
    for item in [*filter(None, (s.strip() for s in spec.split(","))), *files]:
        try:
            _import_in_time(item, timeout)
        except ImportError as e:
            if problems is None:
                raise
            problems.append(str(e))
            continue
        loaded.append(item)
    return loaded
