"""systemd unit files for ``infra master`` and ``infra node`` (``--print-systemd-unit``).

A unit is built from the options given on the command line that asked for it: ExecStart runs this
interpreter (absolute path) with ``-m infra.cli`` and those options, paths made absolute (a service runs in
``/``), and what the command would otherwise find in the caller's environment or config dir (the master's
database, the node's master address and workdir) written out. Secrets are never written into a unit: a
join token goes in a file (``--join-token-file``). Why each setting is what it is: docs/OPERATIONS.md.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from pathlib import Path
from typing import Any

NODE_STOP_MARGIN_S = 60  # after --stop-deadline: TERM grace, reports delivered, spool flushed
MASTER_STOP_TIMEOUT_S = 30
PATH_OPTIONS = {"workdir", "join_token_file", "token_file", "tls_ca", "tls_cert", "tls_key"}
SKIP = {"help", "print_systemd_unit"}
_BARE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")


def quote(arg: str) -> str:
    """One ExecStart word: ``%`` and ``$`` escaped (systemd specifiers, variables), quoted when needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _BARE.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _absolute_sqlite(url: str) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def options(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: dict[str, Any]) -> list[str]:
    """The command-line options of ``args`` that differ from the parser's defaults (``extra``: values to
    use instead, e.g. a default resolved now), in the parser's order."""
    out: list[str] = []
    for action in parser._actions:  # noqa: SLF001 (argparse has no public list of its actions)
        if action.dest in SKIP or not action.option_strings:
            continue
        value = extra.get(action.dest, getattr(args, action.dest, None))
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            if value:
                out.append(flag)
            continue
        if value is None or (value == action.default and action.dest not in extra):
            continue
        if action.dest in PATH_OPTIONS:
            value = str(Path(str(value)).expanduser().resolve())
        elif action.dest == "db":
            value = _absolute_sqlite(str(value))
        out += [flag, str(value)]
    return out


def _environment() -> list[str]:
    lines = []
    for name in ("PYTHONPATH", "INFRA_STAGE_MODULES", "INFRA_CONFIG_DIR"):
        if os.environ.get(name):
            lines.append(f"Environment={quote(name + '=' + os.environ[name])}")
    return lines


def _user() -> list[str]:
    user = getpass.getuser()
    return [] if user == "root" else [f"User={user}"]


def unit(description: str, argv: list[str], service: list[str], after: tuple[str, ...] = ()) -> str:
    exec_start = " ".join(quote(a) for a in [sys.executable, "-m", "infra.cli", *argv])
    lines = [
        "# printed by `infra ... --print-systemd-unit`; see docs/OPERATIONS.md",
        "[Unit]",
        f"Description={description}",
        "Wants=network-online.target",
        "After=" + " ".join(["network-online.target", *after]),
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={exec_start}",
        *_environment(),
        *_user(),
        "KillSignal=SIGTERM",
        *service,
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=2",  # 2: a configuration error or a refusal that a restart does not fix
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def master_unit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    from infra.master.db import default_db_url

    db = _absolute_sqlite(args.db or default_db_url())
    argv = ["master", *options(parser, args, {"db": db})]
    after = ("postgresql.service",) if db.startswith("postgresql") else ()
    return unit(
        "infra master (scheduler and database of the infra cluster)",
        argv,
        [f"TimeoutStopSec={MASTER_STOP_TIMEOUT_S}"],
        after,
    )


def node_unit(parser: argparse.ArgumentParser, args: argparse.Namespace, master: str, workdir: Path) -> str:
    extra = {"master": master, "workdir": str(workdir), "stop_deadline": f"{args.stop_deadline:g}"}
    argv = ["node", *options(parser, args, extra)]
    service = [
        # only the agent gets SIGTERM (and, past TimeoutStopSec, SIGKILL): its stages run in sessions of their
        # own in this unit's cgroup, and the agent stops them itself within --stop-deadline; after a crash
        # (Restart=on-failure) they must survive for the restarted agent to adopt them
        "KillMode=process",
        f"TimeoutStopSec={int(args.stop_deadline) + NODE_STOP_MARGIN_S}",
    ]
    note = []
    if os.environ.get("INFRA_JOIN_TOKEN") and not args.join_token_file:
        note = ["# $INFRA_JOIN_TOKEN is not written into the unit (a secret): pass --join-token-file FILE"]
    return "\n".join(note) + ("\n" if note else "") + unit(f"infra node agent {args.name or ''}".strip(), argv, service)
