"""The ``infra`` command line: master, node, submit, status, logs, metrics, artifacts, cancel, token, demo.

Each verb imports what it needs when it runs (``infra status`` never loads the master or node code).
Read commands take ``--json`` for machine-readable output. The connection options and ``--json``
(:data:`GLOBAL_OPTIONS`) may come before the verb too: ``infra --master HOST:PORT status``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")
# Options a user types once for the session rather than per verb, so they may come before the verb; value:
# whether the option takes a value. Each is still defined (and checked) by the verbs that accept it.
GLOBAL_OPTIONS = {
    "--master": True,
    "--token-file": True,
    "--tls-ca": True,
    "--tls-cert": True,
    "--tls-key": True,
    "--json": False,
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_ENV = "INFRA_LOG_LEVEL"
STATE_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "assigned": "blue"}


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _console() -> Any:
    from rich.console import Console

    return Console()


def _styled(state: str) -> str:
    style = STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _mib(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1024:.1f}G" if v >= 1024 else f"{v:.0f}M"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


# --- verbs -----------------------------------------------------------------------------------


def cmd_master(args: argparse.Namespace) -> int:
    if args.print_systemd_unit:
        from infra.systemd import master_unit

        print(master_unit(args.parser, args), end="")
        return 0
    from infra.master.db import default_db_url
    from infra.master.server import Settings, main
    from infra.spec.plan import parse_bytes

    try:
        level = log_level(args.log_level, Settings.log_level)
    except ValueError as e:
        print(f"infra master: {e}", file=sys.stderr)
        return 2
    try:
        max_bytes = parse_bytes(args.artifact_max_bytes)
    except ValueError as e:
        print(f"infra master: --artifact-max-bytes: {e}", file=sys.stderr)
        return 2
    settings = Settings(
        db_url=args.db or default_db_url(),
        bind=args.bind,
        heartbeat_interval=args.heartbeat,
        lost_timeout=args.lost_timeout,
        home_wait=args.home_wait,
        rendezvous_ports=args.rendezvous_ports,
        auth=args.auth,
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        log_level=level,
        web_port=None if args.no_web else args.web_port,
        artifact_max_bytes=max_bytes,
    )
    return main(settings)


def cmd_node(args: argparse.Namespace) -> int:
    from infra.client import master_address
    from infra.node.agent import main
    from infra.node.identity import default_name
    from infra.node.settings import Options
    from infra.protos.transport import ClientTls, TransportError, read_token
    from infra.spec.plan import parse_memory
    from infra.wkdir import WorkdirError, prepare_workdir, require_workdir

    try:
        workdir = prepare_workdir(args.workdir) if args.workdir else require_workdir()
        memory, spool, min_free, stop_free = (
            None if v is None else parse_memory(int(v) if v.isdigit() else v)
            for v in (args.memory, args.spool_limit, args.min_free_disk, args.stop_free_disk)
        )
        if args.stop_deadline < 0:
            raise ValueError(f"--stop-deadline must be 0 or more seconds, not {args.stop_deadline:g}")
        level = log_level(args.log_level, Options.log_level)
        if args.print_systemd_unit:
            from infra.systemd import node_unit

            print(node_unit(args.parser, args, master_address(args.master), workdir), end="")
            return 0
        tls = ClientTls.from_settings(args.tls_ca, args.tls_cert, args.tls_key)
        token = read_token(args.join_token_file, "INFRA_JOIN_TOKEN")
    except (WorkdirError, TransportError) as e:
        print(f"infra node: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"infra node: {e}", file=sys.stderr)
        return 2
    opts = Options(
        master_address(args.master),
        workdir,
        args.name or default_name(),
        args.heartbeat,
        args.cpus,
        memory,
        args.fake_gpus,
        token=token,
        tls=tls,
        spool_limit_mib=spool,
        min_free_disk_mib=min_free,
        stop_free_disk_mib=stop_free,
        plugin_timeout=args.plugin_timeout,
        stop_deadline=args.stop_deadline,
        log_level=level,
        advertise_address=args.advertise_address,
    )
    return main(opts)


def _client(args: argparse.Namespace) -> Any:
    from infra.client import Client, ClientError, user_token
    from infra.protos.transport import ClientTls, TransportError

    try:
        tls = ClientTls.from_settings(args.tls_ca, args.tls_cert, args.tls_key)
        token = user_token(args.token_file)
    except TransportError as e:
        raise ClientError(str(e)) from None
    return Client(args.master, token=token, tls=tls)


def cmd_submit(args: argparse.Namespace) -> int:
    from infra.node.stage_plugins import load_stage_modules
    from infra.spec.plan import PlanError, force_smoke, load_plan_data, resolve_inputs

    load_stage_modules()
    try:
        data = load_plan_data(args.plan)
        data = resolve_inputs(force_smoke(data) if args.smoke else data, Path.cwd())
        with _client(args) as client:
            key = client.submit(data)
            if args.json and not args.wait:
                _print_json({"experiment": key})
            elif not args.json:
                print(key, flush=True)
            if not args.wait:
                return 0
            if not args.json and _console().is_terminal:
                exp = _watch(client, key)
            else:
                exp = client.wait(key, on_change=None if args.json else _progress_printer())
    except KeyboardInterrupt:
        return 130
    except PlanError as e:
        print(f"infra submit: {args.plan}: plan rejected:", file=sys.stderr)
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(exp)
    else:
        print(f"{key}: {exp['state']}")
    return 0 if exp["state"] == "succeeded" else 1


def _progress_printer() -> Any:
    seen: dict[str, str] = {}

    def show(exp: dict[str, Any]) -> None:
        for s in exp["stages"]:
            if seen.get(s["name"]) != s["state"]:
                seen[s["name"]] = s["state"]
                where = f" on {s['node']}" if s["node"] else ""
                print(
                    f"  {time.strftime('%H:%M:%S')} {s['name']:<16} {s['state']:<10}{where}  {s['reason']}", flush=True
                )

    return show


def _watch(client: Any, key: str, poll: float = 1.0) -> dict[str, Any]:
    """Redraw the experiment's stages with a bar per progress they report, until it ends (a terminal)."""
    from rich.live import Live

    from infra.client import TERMINAL

    exp = client.experiment(key)
    with Live(_stages_view(exp), console=_console(), auto_refresh=False) as live:
        while exp["state"] not in TERMINAL:
            time.sleep(poll)
            exp = client.experiment(key)
            live.update(_stages_view(exp), refresh=True)
    return exp


def _stages_view(exp: dict[str, Any]) -> Any:
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    t = Table(title=f"{exp['experiment']}  {_styled(exp['state'])}", title_justify="left")
    for col in ("stage", "state", "node", "progress"):
        t.add_column(col, no_wrap=col in ("stage", "state"))  # whole names, as in `infra status`
    for s in exp["stages"]:
        bars = Table.grid(padding=(0, 1))
        for p in s["progress"]:
            total = p["total"]
            count = f"{p['done']}/{total}" if total is not None else str(p["done"])
            bars.add_row(p["what"], ProgressBar(total=total, completed=p["done"], width=30), count)
        t.add_row(s["name"], _styled(s["state"]), s["node"] or "-", bars if s["progress"] else s["reason"])
    return t


def _watch_lines(client: Any, key: str, as_json: bool, poll: float = 1.0) -> dict[str, Any]:
    """``status --watch`` without a terminal: a line per change of a stage's state or progress."""
    from infra.client import TERMINAL

    seen: dict[str, Any] = {}
    while True:
        exp = client.experiment(key)
        for s in exp["stages"]:
            now = (s["state"], s["progress"])
            if seen.get(s["name"]) != now:
                seen[s["name"]] = now
                if as_json:
                    print(json.dumps({"stage": s["name"], "state": s["state"], "progress": s["progress"]}), flush=True)
                else:
                    shown = " ".join(
                        f"{p['what']} {p['done']}/{p['total'] if p['total'] is not None else '?'}"
                        for p in s["progress"]
                    )
                    print(f"{time.strftime('%H:%M:%S')} {s['name']:<16} {s['state']:<10} {shown}", flush=True)
        if exp["state"] in TERMINAL:
            return exp
        time.sleep(poll)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        if not args.experiment:
            print("infra status: --watch needs an EXPERIMENT", file=sys.stderr)
            return 2
        try:
            with _client(args) as client:
                if not args.json and _console().is_terminal:
                    exp = _watch(client, args.experiment)
                else:
                    exp = _watch_lines(client, args.experiment, args.json)
        except KeyboardInterrupt:
            return 130
        return 0 if exp["state"] == "succeeded" else 1
    with _client(args) as client:
        data = client.status(args.experiment, args.limit)
    if args.json:
        _print_json(data)
        return 0
    from rich.table import Table

    console = _console()
    nodes = Table(title="nodes", title_justify="left")
    for col in ("node", "state", "heartbeat", "CPUs used/adv.", "memory used/adv.", "GPUs", "GPU use", "CPU%", "kinds"):
        nodes.add_column(col)
    for n in data["nodes"]:
        usage = n["usage"] or {}
        gpus = n.get("gpus") or []
        gpu_names = ", ".join(sorted({g["name"] for g in gpus})) or "-"
        gpu_use = " ".join(f"{g['index']}:{g['utilization_percent']:.0f}%" for g in usage.get("gpus", [])) or "-"
        nodes.add_row(
            f"{n['name']}\n[dim]{n['id'][:8]}[/dim]",
            _node_state(n),
            _age(n["heartbeat_age_s"]),
            f"{n['allocated']['cpus']:g}/{n['cpu_count']}",
            f"{_mib(n['allocated']['memory_mib'])}/{_mib(n['memory_mib'])}",
            f"{len(n['allocated']['gpu_indices'])}/{len(gpus)} {gpu_names}",
            gpu_use,
            f"{usage.get('cpu_percent', 0):.0f}" if usage else "-",
            ", ".join(n.get("stage_kinds", [])),
        )
    console.print(nodes)
    for e in data["experiments"]:
        t = Table(title=f"{e['experiment']}  {_styled(e['state'])}  priority {e['priority']}", title_justify="left")
        # whole stage names (a shard's NAME.shard-I-of-S is told apart by its end): the other columns wrap;
        # `after` folds rather than cut the names it lists
        for col in ("stage", "kind", "state", "node", "attempts", "after", "reason"):
            t.add_column(col, no_wrap=col in ("stage", "state"), overflow="fold" if col == "after" else "ellipsis")
        for s in e["stages"]:
            t.add_row(
                s["name"],
                s["kind"],
                _styled(s["state"]),
                s["node"] or "-",
                str(len({a["number"] for a in s["attempts"]})),
                ", ".join(s["after"]) or "-",
                s["reason"],
            )
        console.print(t)
        if args.attempts:
            _print_attempts(console, e)
    return 0


def _node_state(n: dict[str, Any]) -> str:
    state = "[green]online[/green]" if n["online"] else "[red]offline[/red]"
    if n.get("drained"):
        until = n.get("drain_deadline")
        state += "\n[yellow]drained[/yellow]" + (f" (stops {_when(until)})" if until else "")
    return state


def _when(t: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _print_attempts(console: Any, e: dict[str, Any]) -> None:
    """Every attempt of every stage: number, node, start and end, failure class, exit code, reason."""
    from rich.table import Table

    t = Table(title=f"{e['experiment']}  attempts", title_justify="left")
    for col in ("stage", "#", "node", "state", "started", "finished", "class", "exit", "message"):
        t.add_column(col, no_wrap=col in ("stage", "state"))  # whole names, as in the stage table
    for s in e["stages"]:
        gang = any(a.get("rank") for a in s["attempts"])  # a multi-node stage: one row per member (rank)
        for a in s["attempts"]:
            t.add_row(
                s["name"],
                str(a["number"]) + (f" rank {a['rank']}" if gang else ""),
                a["node"],
                _styled(a["state"]),
                _when(a["started_at"]),
                _when(a["finished_at"]),
                a["failure_class"] or "-",
                str(a["exit_code"]) if a["finished_at"] else "-",
                a["message"],
            )
    console.print(t)


MEMBER_HELP = "the member (rank) of a gang (a stage on several nodes) to show (default: 0, the only one otherwise)"


def _member(text: str) -> int:
    """argparse's type for ``--member``: a rank a gang can have (the master checks it against the stage's)."""
    from infra.spec.plan import MAX_NODES

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < MAX_NODES:
        raise argparse.ArgumentTypeError(f"a member is a rank from 0 to {MAX_NODES - 1}, not {value}")
    return value


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for line in client.logs(args.stage, follow=args.follow, attempt=args.attempt, member=args.member):
            if args.json:
                print(json.dumps(line), flush=True)
            else:
                prefix = "" if line["stream"] == "stdout" else f"[{line['stream']}] "
                print(prefix + line["text"], flush=True)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.metrics(args.stage, args.attempt, args.member)
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    names = sorted({k for r in rows for k in r["values"]})
    t = Table(title=f"metrics of {args.stage}", title_justify="left")
    for col in ("attempt", "step", *names):
        t.add_column(col, justify="right")
    for r in rows:
        cells = [
            "-" if r["values"].get(k, "") is None else f"{r['values'][k]:.6g}" if k in r["values"] else ""
            for k in names
        ]
        t.add_row(str(r["attempt"]), str(r["step"]), *cells)
    _console().print(t)
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    if args.local:
        return _local_artifacts(Path(args.experiment), args.json)
    if args.get:
        return _get_artifact(args)
    with _client(args) as client:
        rows = client.artifacts(args.experiment)
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    t = Table(title=f"artifacts of {args.experiment} (paths relative to the node's workdir)", title_justify="left")
    for col in ("stage", "attempt", "node", "kind", "path"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["stage"], str(r["attempt"]), r["node"], r["kind"], r["path"])
    _console().print(t)
    return 0


def _get_artifact(args: argparse.Namespace) -> int:
    """``--get PATH``: the file through the master into ``-o FILE`` (default: its name, here), resuming a
    partial FILE; a progress bar on a terminal."""
    out = Path(args.output or PurePosixPath(args.get).name)
    with _client(args) as client, _byte_bar(f"{args.experiment}: {args.get}") as on_progress:
        result = client.fetch_artifact(args.experiment, args.get, out, args.offset, on_progress)
    if args.json:
        _print_json(result)
    else:
        resumed = f", resumed at byte {result['resumed_from']}" if result["resumed_from"] else ""
        print(f"{out}: {result['bytes']} bytes, sha256 {result['sha256']}{resumed}")
    return 0


@contextlib.contextmanager
def _byte_bar(title: str) -> Iterator[Callable[[int, int], None] | None]:
    """A transfer bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=Console(stderr=True)
    ) as bar:
        task = bar.add_task(title, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _local_artifacts(root: Path, as_json: bool) -> int:
    """The files of an experiment record on this machine (crystallm_core.layout: stdlib only, no master)."""
    from crystallm_core.layout import ExperimentLayout

    if not root.is_dir():
        print(f"infra artifacts: {root} is not a directory (give <workdir>/experiments/<experiment>)", file=sys.stderr)
        return 2
    rows = [{"path": a.path, "kind": a.kind, "bytes": a.bytes} for a in ExperimentLayout(root).list_artifacts()]
    if as_json:
        _print_json(rows)
        return 0
    from rich.table import Table

    t = Table(title=f"files of the experiment record {root} (paths relative to it)", title_justify="left")
    for col in ("kind", "bytes", "path"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["kind"], str(r["bytes"]), r["path"])
    _console().print(t)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.cancel(args.experiment, args.reason)
    if args.json:
        _print_json(result)
    elif result["finished"]:
        print(f"{args.experiment}: already finished ({result['finished']}); nothing to cancel")
    else:
        print(
            f"{args.experiment}: {result['cancelled']} stage(s) cancelled, {result['signalled']} running stage(s) "
            "told to stop"
        )
    return 0


def cmd_node_admin(args: argparse.Namespace) -> int:
    """``infra node list|drain|undrain``: operator controls (admin only with authentication)."""
    with _client(args) as client:
        if args.action == "list":
            nodes = client.status(limit=1)["nodes"]
        else:
            nodes = [client.drain_node(args.name, args.action == "undrain", args.deadline or 0.0)]
    if args.json:
        _print_json(nodes if args.action == "list" else nodes[0])
        return 0
    if args.action != "list":
        n = nodes[0]
        what = "drained: takes no new stages" if n["drained"] else "undrained: takes new stages again"
        if n["drained"] and n.get("drain_deadline"):
            what += f"; what still runs there is stopped at {_when(n['drain_deadline'])}"
        print(f"node {n['name']}: {what} ({n['running']} running now)")
        return 0
    for n in nodes:
        flags = [n["state"]] + (["drained"] if n.get("drained") else [])
        flags += [f"unavailable: {n['unavailable']}"] if n.get("unavailable") else []
        used = f"cpus {n['allocated']['cpus']:g}/{n.get('cpu_count', 0)}"
        print(f"{n['name']:<20} {n['id'][:8]}  {', '.join(flags):<24} {used}")
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    exp, _, stage = args.target.partition("/")
    with _client(args) as client:
        stages = client.rerun(exp, stage)
    if args.json:
        _print_json({"experiment": exp, "stages": stages})
    else:
        print(f"{exp}: running again: {', '.join(stages)}")
    return 0


def _token_db(args: argparse.Namespace) -> Any:
    """The master's database, for token commands run on the master's machine (``--db``)."""
    from infra.master.db import default_db_url, make_engine, migrate

    engine = make_engine(args.db or default_db_url())
    migrate(engine)
    return engine


def cmd_token(args: argparse.Namespace) -> int:
    role = "node" if getattr(args, "join", False) else "admin" if getattr(args, "admin", False) else "user"
    if args.db is not None:
        from sqlalchemy.orm import Session

        from infra.master import auth

        engine = _token_db(args)
        try:
            if args.action == "create":
                with Session(engine) as s, s.begin():
                    token, row = auth.create_token(s, args.user or args.label, role)
                result: Any = {
                    "id": row["id"],
                    "user": row["user"],
                    "role": role,
                    "created_at": row["created_at"],
                    "revoked": False,
                    "token": token,
                }
            elif args.action == "list":
                result = [
                    {**{k: r[k] for k in ("id", "user", "role", "created_at")}, "revoked": r["revoked_at"] is not None}
                    for r in auth.list_tokens(engine)
                ]
            else:
                with Session(engine) as s, s.begin():
                    result = {"id": args.id, "revoked": auth.revoke_token(s, args.id)}
        except ValueError as e:
            print(f"infra token: {e}", file=sys.stderr)
            return 2
        finally:
            engine.dispose()
    else:
        with _client(args) as client:
            if args.action == "create":
                result = client.create_token(args.user or args.label, role)
            elif args.action == "list":
                result = client.list_tokens()
            else:
                result = {"id": args.id, "revoked": client.revoke_token(args.id)}
    if args.json:
        _print_json(result)
    elif args.action == "create":
        print(result["token"])
        print(
            f"token {result['id']} for {result['user']!r} (role {role}); it is shown only now: keep it in a file "
            "readable by you only",
            file=sys.stderr,
        )
    elif args.action == "list":
        for t in result:
            state = "revoked" if t["revoked"] else "active"
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(t["created_at"]))
            print(f"{t['id']:>5}  {t['role']:<6} {t['user']:<24} {when}  {state}")
    else:
        print(f"token {args.id} " + ("revoked" if result["revoked"] else "was already revoked or does not exist"))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from infra.demo import run_demo

    return run_demo(keep=args.keep, as_json=args.json)


# --- parser ----------------------------------------------------------------------------------


def tls_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--tls-ca", metavar="PEM", help="CA of the master's certificate: use TLS ($INFRA_TLS_CA)")
    sp.add_argument("--tls-cert", metavar="PEM", help="this side's certificate, for mutual TLS ($INFRA_TLS_CERT)")
    sp.add_argument("--tls-key", metavar="PEM", help="its private key, for mutual TLS ($INFRA_TLS_KEY)")


def connection_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--master", metavar="HOST:PORT", help="master address (default: $INFRA_MASTER or 127.0.0.1:50051)")
    sp.add_argument(
        "--token-file", metavar="PATH", help="file holding your token (default: $INFRA_TOKEN, <config dir>/token)"
    )
    tls_flags(sp)


def log_level_flag(sp: argparse.ArgumentParser, default: str) -> None:
    """``--log-level`` of the long-running commands; unset, :func:`log_level` reads ``$INFRA_LOG_LEVEL``."""
    sp.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"log threshold: {', '.join(LOG_LEVELS)} (default: ${LOG_LEVEL_ENV}, else {default})",
    )


def log_level(given: str | None, default: str) -> str:
    """The log level: ``--log-level``, else ``$INFRA_LOG_LEVEL``, else ``default``; a bad value names its source."""
    if given is not None:
        return given
    value = os.environ.get(LOG_LEVEL_ENV, "").strip().upper() or default
    if value not in LOG_LEVELS:
        raise ValueError(f"${LOG_LEVEL_ENV} is {os.environ[LOG_LEVEL_ENV]!r}; give one of {', '.join(LOG_LEVELS)}")
    return value


def systemd_unit_flag(sp: argparse.ArgumentParser, what: str) -> None:
    """``--print-systemd-unit``, for the long-running commands (``what`` the unit runs)."""
    sp.add_argument(
        "--print-systemd-unit",
        action="store_true",
        help=f"print a systemd unit running {what} with the other options given here, and exit",
    )


def _port_range(text: str) -> tuple[int, int]:
    """argparse's type for ``--rendezvous-ports`` (its error names the flag)."""
    from infra.master.config import port_range

    try:
        return port_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_master(sub: Any) -> None:
    """``infra master``: the master's own settings, defaults from ``infra.master.config.Settings``."""
    from infra.master.config import LOST_HEARTBEATS, Settings  # standard library only: the defaults, in one place

    sp = sub.add_parser("master", help="run the master (gRPC server, scheduler, database)")
    sp.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default sqlite:///<config dir>/master.db)")
    sp.add_argument("--bind", default=Settings.bind, metavar="HOST:PORT", help="listen address (port 0: any free)")
    sp.add_argument(
        "--heartbeat",
        type=float,
        default=Settings.heartbeat_interval,
        help=f"heartbeat interval nodes are expected to keep (s; default {Settings.heartbeat_interval:g})",
    )
    sp.add_argument(
        "--lost-timeout",
        type=float,
        default=Settings.lost_timeout,
        help="declare a node lost after this many seconds without a heartbeat (default: "
        f"{LOST_HEARTBEATS} heartbeat intervals, {LOST_HEARTBEATS * Settings.heartbeat_interval:g} s); "
        "its stages are retried within their node_lost budget",
    )
    sp.add_argument(
        "--home-wait",
        type=float,
        default=Settings.home_wait,
        help="how long an experiment without a shared workdir waits for its lost home node (which holds its "
        f"files) before starting over on another node (default {Settings.home_wait:g} s)",
    )
    first, last = Settings.rendezvous_ports
    sp.add_argument(
        "--rendezvous-ports",
        type=_port_range,
        default=Settings.rendezvous_ports,
        metavar="FIRST-LAST",
        help="ports the master gives a multi-node stage's rendezvous on its first node (one per running gang on "
        f"a node; nodes must reach each other on them; default {first}-{last})",
    )
    sp.add_argument("--auth", action="store_true", help="require a token on every call (see `infra token`)")
    sp.add_argument("--insecure", action="store_true", help="allow listening on a non-loopback address without --auth")
    sp.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain)")
    sp.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    sp.add_argument("--tls-ca", metavar="PEM", help="require client certificates signed by this CA (mutual TLS)")
    log_level_flag(sp, Settings.log_level)
    sp.add_argument(
        "--web-port",
        type=int,
        default=Settings.web_port,
        metavar="PORT",
        help=f"serve the dashboard and Prometheus /metrics on --bind's host at this port (default {Settings.web_port}; "
        "0: any free port); same authentication and TLS as gRPC",
    )
    sp.add_argument("--no-web", action="store_true", help="serve no dashboard and no /metrics")
    sp.add_argument(
        "--artifact-max-bytes",
        default=f"{Settings.artifact_max_bytes >> 30}GiB",
        metavar="SIZE",
        help="the largest file of a record relayed to a client (`infra artifacts --get`, dashboard downloads); "
        'a size like "64GiB" or a whole number of bytes (default %(default)s)',
    )
    systemd_unit_flag(sp, "the master")
    sp.set_defaults(func=cmd_master, parser=sp)


def _add_node(sub: Any) -> None:
    """``infra node``: its defaults are the agent's settings (infra.node.settings.Options)."""
    from infra.node.settings import Options  # standard library only: the defaults, not the agent

    sp = sub.add_parser("node", help="run a node agent on this machine")
    sp.add_argument("--master", metavar="HOST:PORT", help="master address (default: $INFRA_MASTER or 127.0.0.1:50051)")
    sp.add_argument(
        "--join-token-file", metavar="PATH", help="file holding the cluster join token (default: $INFRA_JOIN_TOKEN)"
    )
    tls_flags(sp)
    sp.add_argument(
        "--heartbeat",
        type=float,
        default=Options.heartbeat,
        help=f"seconds between heartbeats (default {Options.heartbeat:g})",
    )
    sp.add_argument("--name", help="node name (default: the hostname); also keys its identity in the workdir")
    sp.add_argument("--workdir", help="use this workdir instead of the one set with infra-wkdir")
    sp.add_argument("--cpus", type=int, help="advertise this many CPUs instead of the machine's count")
    sp.add_argument("--memory", help='advertise this much memory (e.g. "16GiB") instead of the machine\'s')
    sp.add_argument("--fake-gpus", type=int, metavar="N", help="advertise N fake GPUs instead of NVML's (testing)")
    sp.add_argument(
        "--advertise-address",
        metavar="HOST",
        help="where the other nodes of a multi-node stage reach this one (its rendezvous when it runs member 0; "
        'default: this machine\'s address on its route to the master; "": take no part in them)',
    )
    sp.add_argument(
        "--spool-limit",
        metavar="SIZE",
        default=f"{Options.spool_limit_mib}MiB",
        help="events kept on disk while the master is away (default %(default)s); "
        "when full, the oldest log lines are dropped first (counted)",
    )
    sp.add_argument(
        "--min-free-disk",
        metavar="SIZE",
        default=f"{Options.min_free_disk_mib}MiB",
        help="take no new stage when the workdir has less free space (default %(default)s)",
    )
    sp.add_argument(
        "--stop-free-disk",
        metavar="SIZE",
        help="stop a running stage (failed, with the reason) when the workdir has less free space "
        "(default: half of --min-free-disk)",
    )
    sp.add_argument(
        "--plugin-timeout",
        type=float,
        default=Options.plugin_timeout,
        help=f"seconds a stage-kind plugin may take to import (default {Options.plugin_timeout:g})",
    )
    sp.add_argument(
        "--stop-deadline",
        type=float,
        default=Options.stop_deadline,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT take no new stages and give running ones this long to finish, then stop them "
        "(failed, preempted: retried elsewhere); 0: stop them at once; a second signal stops them now "
        f"(default {Options.stop_deadline:g})",
    )
    log_level_flag(sp, Options.log_level)
    systemd_unit_flag(sp, "this node agent")
    sp.set_defaults(func=cmd_node, parser=sp)


def _add_client_verbs(sub: Any) -> None:
    """The verbs that call the master as a client: submit, status, logs, metrics, artifacts, cancel, rerun."""

    def client_verb(name: str, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        connection_flags(sp)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = client_verb("submit", "submit a plan; prints the experiment id")
    sp.add_argument("plan", help="plan JSON file")
    sp.add_argument("--wait", action="store_true", help="follow until it finishes; exit 1 unless it succeeded")
    sp.add_argument(
        "--smoke",
        action="store_true",
        help='run in smoke mode, as "smoke": true in the plan does: every stage on the CPU with tiny limits',
    )
    sp.set_defaults(func=cmd_submit)

    sp = client_verb("status", "nodes and experiments")
    sp.add_argument("experiment", nargs="?", help="one experiment (with its state transitions)")
    sp.add_argument("--limit", type=int, default=0, help="most recent experiments to show (default 50)")
    sp.add_argument(
        "--attempts", action="store_true", help="list every attempt: node, start, end, failure class, exit, reason"
    )
    sp.add_argument(
        "--watch",
        action="store_true",
        help="follow EXPERIMENT's stages and their progress live until it ends (exit 1 unless it succeeded); "
        "without a terminal, a line per change (--json: a JSON object per line)",
    )
    sp.set_defaults(func=cmd_status)

    sp = client_verb("logs", "a stage's log lines")
    sp.add_argument("stage", help="EXPERIMENT/STAGE or a numeric stage id")
    sp.add_argument("-f", "--follow", action="store_true", help="keep following until the stage ends")
    sp.add_argument("--attempt", type=int, default=0, help="attempt number (default: the latest)")
    sp.add_argument("--member", type=_member, default=0, help=MEMBER_HELP)
    sp.set_defaults(func=cmd_logs)

    sp = client_verb("metrics", "a stage's metrics")
    sp.add_argument("stage", help="EXPERIMENT/STAGE or a numeric stage id")
    sp.add_argument("--attempt", type=int, default=0, help="attempt number (default: all)")
    sp.add_argument("--member", type=_member, default=0, help=MEMBER_HELP)
    sp.set_defaults(func=cmd_metrics)

    sp = client_verb("artifacts", "artifacts an experiment's stages reported")
    sp.add_argument("experiment", help="experiment id; with --local, an experiment directory")
    sp.add_argument(
        "--local",
        action="store_true",
        help="list the files of the experiment record in the directory EXPERIMENT on this machine (no master)",
    )
    sp.add_argument(
        "--get",
        metavar="PATH",
        help="fetch this file of the record from the node that holds it, through the master (PATH relative to "
        "the experiment directory, or as listed); a partial -o FILE is resumed",
    )
    sp.add_argument("-o", "--output", metavar="FILE", help="with --get: where to write (default: the file's name)")
    sp.add_argument(
        "--offset", type=int, metavar="BYTES", help="with --get: fetch from this byte on (default: FILE's size)"
    )
    sp.set_defaults(func=cmd_artifacts)

    sp = client_verb("cancel", "cancel an experiment (running stages are stopped)")
    sp.add_argument("experiment", help="experiment id")
    sp.add_argument("--reason", default="", help="recorded with the cancellation")
    sp.set_defaults(func=cmd_cancel)

    sp = client_verb("rerun", "run an experiment's unfinished stages again, or a stage and every stage after it")
    sp.add_argument(
        "target", metavar="EXPERIMENT[/STAGE]", help="an experiment, or one stage of it (that stage and what follows)"
    )
    sp.set_defaults(func=cmd_rerun)


def _add_token(sub: Any) -> None:
    """``infra token create|list|revoke``."""
    sp = sub.add_parser("token", help="create, list or revoke access tokens (admin)")
    token_sub = sp.add_subparsers(dest="action", metavar="ACTION", required=True)

    def token_verb(name: str, help_text: str) -> argparse.ArgumentParser:
        tp = token_sub.add_parser(name, help=help_text, description=help_text)
        tp.add_argument(
            "--db",
            metavar="URL",
            nargs="?",
            const="",
            help="work on the master's database directly (on the master's "
            "machine; how the first admin token is made); without a URL the default database. Otherwise: an admin "
            "call to the master",
        )
        connection_flags(tp)
        tp.add_argument("--json", action="store_true", help="print JSON")
        tp.set_defaults(func=cmd_token)
        return tp

    tp = token_verb("create", "create a token and print it (once)")
    who = tp.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="NAME", help="a user's token")
    who.add_argument("--join", action="store_true", help="a cluster join token for node agents")
    tp.add_argument("--admin", action="store_true", help="the user is an admin (all experiments, token management)")
    tp.add_argument("--label", default="nodes", help="a join token's name in listings (default: nodes)")
    token_verb("list", "list tokens (never their secrets)")
    tp = token_verb("revoke", "revoke a token by id")
    tp.add_argument("id", type=int, help="the token's id (infra token list)")


def _add_demo(sub: Any) -> None:
    """``infra demo``."""
    sp = sub.add_parser("demo", help="a master, one node and the demo plan, all local, in a temporary workdir")
    sp.add_argument("--keep", action="store_true", help="keep the temporary directory and print where it is")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")
    sp.set_defaults(func=cmd_demo)


def version_flag(p: argparse.ArgumentParser) -> None:
    from infra import __version__

    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infra",
        description="Run experiment plans on a cluster of GPU machines.",
        epilog=f"{', '.join(GLOBAL_OPTIONS)} may come before or after the verb: infra --master HOST:PORT status",
    )
    version_flag(p)
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in (_add_master, _add_node, _add_client_verbs, _add_token, _add_demo):
        add(sub)
    return p


NODE_ACTIONS = ("list", "drain", "undrain")


def node_admin_parser() -> argparse.ArgumentParser:
    """``infra node list|drain|undrain``: a parser of its own, since ``infra node`` runs the agent."""
    p = argparse.ArgumentParser(prog="infra node", description="operator controls for nodes (admin)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in (
        ("list", "list the nodes, their state and whether they are drained"),
        ("drain", "take no new stages on a node (running ones finish; persisted)"),
        ("undrain", "let a drained node take new stages again"),
    ):
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name != "list":
            sp.add_argument("name", help="node name or id")
        if name == "drain":
            sp.add_argument(
                "--deadline",
                type=float,
                metavar="SECONDS",
                help="after this long, stop what still runs there (failure class preempted; retried elsewhere)",
            )
        connection_flags(sp)
        sp.add_argument("--json", action="store_true", help="print JSON")
        sp.set_defaults(func=cmd_node_admin, verb="node", deadline=None)
    return p


def globals_after_verb(argv: list[str]) -> list[str]:
    """``argv`` with the :data:`GLOBAL_OPTIONS` given before the verb moved to the end, where the verb's own
    parser reads them (and refuses one that the verb does not take, as it would after the verb)."""
    i = 0
    while i < len(argv) and (name := argv[i].split("=", 1)[0]) in GLOBAL_OPTIONS:
        i += 2 if GLOBAL_OPTIONS[name] and "=" not in argv[i] else 1
    return argv[i:] + argv[:i] if i else argv


def main(argv: list[str] | None = None) -> int:
    argv = globals_after_verb(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "node" and argv[1] in NODE_ACTIONS:
        args = node_admin_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    from infra.client import ClientError

    try:
        return int(args.func(args) or 0)
    except ClientError as e:
        print(f"infra {args.verb}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
