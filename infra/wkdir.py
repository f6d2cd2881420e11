"""The node's workdir, persisted in the user's config directory (``infra-wkdir --set/--get/--clear``).

Layout under the workdir::

    experiments/<experiment>/<stage>/   one directory per stage (its cwd; events.jsonl, outputs)
    nodes/<name>.json                   persistent node identity ({"id", "name", "created"})
    plugins/                            stage-kind plugins for this node (a later feature)

The config directory is ``$INFRA_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/infra``, else
``~/.config/infra``; the workdir path is the single line of its file ``wkdir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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


def _file() -> Path:
    return config_dir() / "wkdir"


def prepare_workdir(path: str | Path) -> Path:
    """Create the workdir (and its layout) if needed and prove it is writable; return it absolute."""
    p = Path(path).expanduser().resolve()
    try:
        p.mkdir(parents=True, exist_ok=True)
        for sub in ("experiments", "nodes", "plugins"):
            (p / sub).mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as e:
        raise WorkdirError(f"workdir {p} is not usable: {e.strerror or e}") from None
    return p


def set_workdir(path: str | Path) -> Path:
    p = prepare_workdir(path)
    cfg = _file()
    cfg.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.with_suffix(".tmp")
    tmp.write_text(f"{p}\n", encoding="utf-8")
    tmp.replace(cfg)
    return p


def get_workdir() -> Path | None:
    try:
        text = _file().read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return Path(text) if text else None


def clear_workdir() -> bool:
    try:
        _file().unlink()
    except FileNotFoundError:
        return False
    return True


def require_workdir() -> Path:
    """The configured workdir, ready for use, or a :class:`WorkdirError` that says how to set one."""
    p = get_workdir()
    if p is None:
        raise WorkdirError(f"no workdir is configured (looked in {_file()}); {SET_HINT}")
    return prepare_workdir(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra-wkdir", description="Set, show or clear this node's workdir.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--set", metavar="PATH", help="create PATH if needed, check it is writable and remember it")
    group.add_argument("--get", action="store_true", help="print the workdir (exit 1 if none is set)")
    group.add_argument("--clear", action="store_true", help="forget the workdir (its files stay)")
    args = parser.parse_args(argv)
    try:
        if args.set:
            print(set_workdir(args.set))
        elif args.get:
            p = get_workdir()
            if p is None:
                print(f"no workdir is set; {SET_HINT}", file=sys.stderr)
                return 1
            print(p)
        else:
            print("workdir cleared" if clear_workdir() else "no workdir was set")
    except WorkdirError as e:
        print(f"infra-wkdir: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
