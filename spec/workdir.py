"""The workdir setting: which directory a machine works in, remembered in the user's config directory.

The config directory is ``$INFRA_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/infra``, else ``~/.config/infra``;
the workdir path is the single line of its file ``wkdir`` (written by ``infra-wkdir --set``). What lives
*in* a workdir (``experiments/``, ``nodes/``, ``plugins/``) is the experiment layout's business
(``crystallm_core/layout.py``): callers pass the folders to create.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

SET_HINT = "set one with: infra-wkdir --set /path/to/workdir"


class WorkdirError(RuntimeError):
    pass


def config_dir() -> Path:
    if os.environ.get("INFRA_CONFIG_DIR"):
        return Path(os.environ["INFRA_CONFIG_DIR"]).expanduser()
    if os.environ.get("XDG_CONFIG_HOME"):
        return Path(os.environ["XDG_CONFIG_HOME"]).expanduser() / "infra"
    return Path.home() / ".config" / "infra"


def setting_file() -> Path:
    return config_dir() / "wkdir"


def prepare_workdir(path: str | Path, folders: Iterable[str] = ()) -> Path:
    """Create the workdir (and ``folders`` in it) if needed and prove it is writable; return it absolute."""
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        for sub in folders:
            (p / sub).mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise WorkdirError(f"workdir {p} is not usable: {e.strerror or e}") from None
    return p


def set_workdir(path: str | Path, folders: Iterable[str] = ()) -> Path:
    p = prepare_workdir(path, folders)
    cfg = setting_file()
    cfg.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.with_suffix(".tmp")
    tmp.write_text(f"{p}\n", encoding="utf-8")
    tmp.replace(cfg)
    return p


def get_workdir() -> Path | None:
    try:
        text = setting_file().read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return Path(text) if text else None


def clear_workdir() -> bool:
    try:
        setting_file().unlink()
    except FileNotFoundError:
        return False
    return True


def require_workdir(folders: Iterable[str] = ()) -> Path:
    """The configured workdir, ready for use, or a :class:`WorkdirError` that says how to set one."""
    p = get_workdir()
    if p is None:
        raise WorkdirError(f"no workdir is configured (looked in {setting_file()}); {SET_HINT}")
    return prepare_workdir(p, folders)
