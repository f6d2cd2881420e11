"""The ``infra`` command line: master, node, submit, status, logs, metrics, artifacts, cancel, demo.

Each verb imports what it needs when it runs (``infra status`` never loads the master or node code).
Read commands take ``--json`` for machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = ("succeeded", "failed", "cancelled")
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
    from master.db import default_db_url
    from master.server import main

    return main(args.db or default_db_url(), args.bind, args.heartbeat)


def cmd_node(args: argparse.Namespace) -> int:
    from infra.client import master_address
    from infra.plan import parse_memory
    from infra.wkdir import WorkdirError, prepare_workdir, require_workdir
    from node.agent import Options, main
    from node.identity import default_name

    try:
        workdir = prepare_workdir(args.workdir) if args.workdir else require_workdir()
        memory = None
        if args.memory is not None:
            memory = parse_memory(int(args.memory) if args.memory.isdigit() else args.memory)
    except WorkdirError as e:
        print(f"infra node: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"infra node: --memory: {e}", file=sys.stderr)
        return 2
    opts = Options(
        master_address(args.master),
        workdir,
        args.name or default_name(),
        args.heartbeat,
        args.cpus,
        memory,
        args.fake_gpus,
    )
    return main(opts)


def _client(args: argparse.Namespace) -> Any:
    from infra.client import Client

    return Client(args.master)


def cmd_submit(args: argparse.Namespace) -> int:
    from infra.plan import PlanError, load_plan_data, resolve_inputs
    from infra.stages import load_stage_modules

    load_stage_modules()
    try:
        data = resolve_inputs(load_plan_data(args.plan), Path.cwd())
        with _client(args) as client:
            key = client.submit(data)
            if args.json and not args.wait:
                _print_json({"experiment": key})
            elif not args.json:
                print(key, flush=True)
            if not args.wait:
                return 0
            exp = client.wait(key, on_change=None if args.json else _progress_printer())
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


def cmd_status(args: argparse.Namespace) -> int:
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
            "[green]online[/green]" if n["online"] else "[red]offline[/red]",
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
        for col in ("stage", "kind", "state", "node", "attempts", "after", "reason"):
            t.add_column(col)
        for s in e["stages"]:
            t.add_row(
                s["name"],
                s["kind"],
                _styled(s["state"]),
                s["node"] or "-",
                str(len(s["attempts"])),
                ", ".join(s["after"]) or "-",
                s["reason"],
            )
        console.print(t)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for line in client.logs(args.stage, follow=args.follow, attempt=args.attempt):
            if args.json:
                print(json.dumps(line), flush=True)
            else:
                prefix = "" if line["stream"] == "stdout" else f"[{line['stream']}] "
                print(prefix + line["text"], flush=True)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.metrics(args.stage, args.attempt)
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


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.cancel(args.experiment, args.reason)
    if args.json:
        _print_json(result)
    else:
        print(
            f"{args.experiment}: {result['cancelled']} stage(s) cancelled, {result['signalled']} running stage(s) "
            "told to stop"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from infra.demo import run_demo

    return run_demo(keep=args.keep, as_json=args.json)


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infra", description="Run experiment plans on a cluster of GPU machines.")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def client_verb(name: str, help_text: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.add_argument(
            "--master", metavar="HOST:PORT", help="master address (default: $INFRA_MASTER or 127.0.0.1:50051)"
        )
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON")
        return sp

    sp = sub.add_parser("master", help="run the master (gRPC server, scheduler, database)")
    sp.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default sqlite:///<config dir>/master.db)")
    sp.add_argument("--bind", default="127.0.0.1:50051", metavar="HOST:PORT", help="listen address (port 0: any free)")
    sp.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval nodes are expected to keep (s)")
    sp.set_defaults(func=cmd_master)

    sp = sub.add_parser("node", help="run a node agent on this machine")
    sp.add_argument("--master", metavar="HOST:PORT", help="master address (default: $INFRA_MASTER or 127.0.0.1:50051)")
    sp.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats (default 5)")
    sp.add_argument("--name", help="node name (default: the hostname); also keys its identity in the workdir")
    sp.add_argument("--workdir", help="use this workdir instead of the one set with infra-wkdir")
    sp.add_argument("--cpus", type=int, help="advertise this many CPUs instead of the machine's count")
    sp.add_argument("--memory", help='advertise this much memory (e.g. "16GiB") instead of the machine\'s')
    sp.add_argument("--fake-gpus", type=int, metavar="N", help="advertise N fake GPUs instead of NVML's (testing)")
    sp.set_defaults(func=cmd_node)

    sp = client_verb("submit", "submit a plan; prints the experiment id")
    sp.add_argument("plan", help="plan JSON file")
    sp.add_argument("--wait", action="store_true", help="follow until it finishes; exit 1 unless it succeeded")
    sp.set_defaults(func=cmd_submit)

    sp = client_verb("status", "nodes and experiments")
    sp.add_argument("experiment", nargs="?", help="one experiment (with its state transitions)")
    sp.add_argument("--limit", type=int, default=0, help="most recent experiments to show (default 50)")
    sp.set_defaults(func=cmd_status)

    sp = client_verb("logs", "a stage's log lines")
    sp.add_argument("stage", help="EXPERIMENT/STAGE or a numeric stage id")
    sp.add_argument("-f", "--follow", action="store_true", help="keep following until the stage ends")
    sp.add_argument("--attempt", type=int, default=0, help="attempt number (default: the latest)")
    sp.set_defaults(func=cmd_logs)

    sp = client_verb("metrics", "a stage's metrics")
    sp.add_argument("stage", help="EXPERIMENT/STAGE or a numeric stage id")
    sp.add_argument("--attempt", type=int, default=0, help="attempt number (default: all)")
    sp.set_defaults(func=cmd_metrics)

    sp = client_verb("artifacts", "artifacts an experiment's stages reported")
    sp.add_argument("experiment")
    sp.set_defaults(func=cmd_artifacts)

    sp = client_verb("cancel", "cancel an experiment (running stages are stopped)")
    sp.add_argument("experiment")
    sp.add_argument("--reason", default="", help="recorded with the cancellation")
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser("demo", help="a master, one node and the demo plan, all local, in a temporary workdir")
    sp.add_argument("--keep", action="store_true", help="keep the temporary directory and print where it is")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
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
