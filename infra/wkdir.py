"""``infra-wkdir --set/--get/--clear``: this machine's workdir, remembered in the user's config directory.

The setting itself (where it is stored, reading and writing it) is ``infra.spec.workdir``. A workdir holds::

    experiments/<experiment>/   one experiment record each (crystallm_core/layout.py: plan.json, logs/<stage>.log,
                                work/<stage>/, samples/<stage>/, ...)
    nodes/<name>.json           persistent node identity ({"id", "name", "created"})
    plugins/<kind>/*.py         this machine's plugins (scorer, vocab, model, metrics, stage; docs/PLUGINS.md)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crystallm_core.layout import WORKDIR_FOLDERS
from infra.spec import workdir as setting
from infra.spec.workdir import SET_HINT, WorkdirError, clear_workdir, config_dir, get_workdir

__all__ = ["SET_HINT", "WorkdirError", "clear_workdir", "config_dir", "get_workdir", "main"]
__all__ += ["prepare_workdir", "require_workdir", "set_workdir"]


def prepare_workdir(path: str | Path) -> Path:
    """Create the workdir and its top-level folders if needed and prove it is writable; return it absolute."""
    return setting.prepare_workdir(path, WORKDIR_FOLDERS)


def set_workdir(path: str | Path) -> Path:
    return setting.set_workdir(path, WORKDIR_FOLDERS)


def require_workdir() -> Path:
    """The configured workdir, ready for use, or a :class:`WorkdirError` that says how to set one."""
    return setting.require_workdir(WORKDIR_FOLDERS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infra-wkdir", description="Set, show or clear this node's workdir.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--set", metavar="PATH", help="create PATH if needed, check it is writable and remember it")
    group.add_argument("--get", action="store_true", help="print the workdir (exit 1 if none is set)")
    group.add_argument("--clear", action="store_true", help="forget the workdir (its files stay)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
