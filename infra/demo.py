"""``infra demo``: a master on SQLite and one node in a temporary directory, the demo plan, live progress.

The master and the node are real subprocesses talking gRPC on loopback, exactly as on a cluster.
The plan is :data:`DEMO_PLAN` (the same as ``examples/demo.json``): demo data -> train ``tiny`` ->
sample -> evaluate. On an installation whose ``crystallm`` lacks ``train`` or ``sample``, the node
does not offer those kinds and the demo runs the stages that exist (demo data -> evaluate it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# The three cubic AX prototypes: every one of their 117 compositions, a language regular enough for the tiny
# model to learn in about a minute of CPU time (docs/DEMO_DATA.md, "Tuning the demo").
DEMO_PROTOTYPES = ["rocksalt", "cscl", "zincblende"]
DEMO_PLAN: dict[str, Any] = {
    "name": "demo",
    "priority": 0,
    "smoke": False,
    "shared_workdir": False,
    "resources": {"gpus": 0, "cpus": 1, "memory": "2GiB"},
    "stages": [
        {
            "name": "prepare",
            "kind": "prepare",
            "params": {"demo": {"n": 117, "seed": 0, "prototypes": DEMO_PROTOTYPES}, "workers": 1},
        },
        {
            "name": "train",
            "kind": "train",
            "after": ["prepare"],
            "params": {
                "data_dir": "data",
                "model": "tiny",
                "max_steps": 400,
                "batch_size": 8,
                "overrides": {
                    "block_size": 320,
                    "lr": 0.003,
                    "min_lr": 0.0001,
                    "warmup_steps": 20,
                    "eval_interval": 400,
                },
            },
        },
        {
            "name": "sample",
            "kind": "sample",
            "after": ["train"],
            "params": {
                "model": "ckpts/last.pt",
                "prompt": "Na4Cl4",
                "num_samples": 16,
                "max_tokens": 320,
                "temperature": 0.7,
                "seed": 0,
            },
        },
        {
            "name": "evaluate",
            "kind": "evaluate",
            "after": ["sample"],
            "params": {"inputs": ["samples/sample"], "workers": 1},
        },
    ],
}
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 600.0


def demo_plan(kinds: set[str]) -> tuple[dict[str, Any], str]:
    """The full demo plan when the node offers every kind in it, else the part that runs today."""
    missing = sorted({s["kind"] for s in DEMO_PLAN["stages"]} - kinds)
    if not missing:
        return DEMO_PLAN, ""
    reduced = {
        **DEMO_PLAN,
        "stages": [
            DEMO_PLAN["stages"][0],
            {
                "name": "evaluate",
                "kind": "evaluate",
                "after": ["prepare"],
                "params": {"inputs": ["artifacts/prepare/demo.csv.gz"], "workers": 1},
            },
        ],
    }
    return reduced, f"this installation lacks stage kind(s) {', '.join(missing)}; running prepare -> evaluate"


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli", *args]


def start_master(
    db_url: str, env: dict[str, str], log_path: Path, *flags: str, port: int = 0, cwd: Path | None = None
) -> tuple[subprocess.Popen[str], str, str]:
    """Start ``infra master`` on loopback (``port`` 0: a free one) with ``flags``, its log appended to
    ``log_path``; returns the process, the gRPC address and the dashboard's URL (empty with ``--no-web``) it
    printed once listening. The demo, the control-plane tests and the benchmarks all start their masters
    here."""
    log = log_path.open("a")
    if "--web-port" not in flags and "--no-web" not in flags:
        flags = (*flags, "--web-port", "0")  # a free port: several masters may run on one machine
    proc = subprocess.Popen(
        _python("master", "--db", db_url, "--bind", f"127.0.0.1:{port}", *flags),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
        cwd=cwd,
    )
    found: list[str] = []
    dashboard: list[str] = []  # printed before the listening line, so known once that is

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if " dashboard on " in line and not dashboard:
                dashboard.append(line.split(" dashboard on ", 1)[1].split()[0])
            if "listening on " in line and not found:
                found.append(line.split("listening on ", 1)[1].split()[0])

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not found:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the master did not start; its log ({log_path}):\n{log_path.read_text()[-4000:]}")
            time.sleep(0.05)
    except BaseException:  # a Ctrl-C while it starts included: the caller has no handle on it yet
        stop(proc)
        raise
    return proc, found[0], dashboard[0] if dashboard else ""


def stop(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)  # bounded: a process that outlives SIGKILL is stuck in the kernel; say so, don't hang


def _table(exp: dict[str, Any], last_metric: dict[str, str]) -> Any:
    from rich.table import Table

    t = Table(title=f"{exp['experiment']}: {exp['state']}", title_justify="left")
    for col in ("stage", "kind", "state", "node", "latest metrics / reason"):
        t.add_column(col)
    for s in exp["stages"]:
        t.add_row(s["name"], s["kind"], s["state"], s["node"] or "-", last_metric.get(s["name"]) or s["reason"])
    return t


def _latest(client: Any, exp: dict[str, Any]) -> dict[str, str]:
    out = {}
    for s in exp["stages"]:
        if s["state"] in ("running", "succeeded"):
            rows = client.metrics(f"{exp['experiment']}/{s['name']}")
            if rows:
                vals = rows[-1]["values"]
                shown = ", ".join(f"{k}={v:.4g}" for k, v in list(vals.items())[:4] if v is not None)
                out[s["name"]] = f"step {rows[-1]['step']}: {shown}"
    return out


def run_demo(keep: bool = False, as_json: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    from infra.client import Client, ClientError

    console = Console(stderr=as_json)
    tmp = Path(tempfile.mkdtemp(prefix="infra-demo-"))
    env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp / "config")}
    procs: list[subprocess.Popen[Any]] = []
    started = time.monotonic()
    try:
        master, address, dashboard = start_master(
            f"sqlite:///{tmp / 'master.db'}", env, tmp / "master.log", "--heartbeat", "1"
        )
        procs.append(master)
        console.print(f"master on {address} (database {tmp / 'master.db'})")
        console.print(f"dashboard on {dashboard} while the demo runs")
        node_log = (tmp / "node.log").open("w")
        node_cmd = _python(
            "node",
            "--master",
            address,
            "--workdir",
            str(tmp / "work"),
            "--name",
            "demo-node",
            "--heartbeat",
            "1",
            "--stop-deadline",
            "0",  # a demo that is stopped stops its stages at once
        )
        procs.append(subprocess.Popen(node_cmd, stdout=node_log, stderr=subprocess.STDOUT, env=env))
        with Client(address) as client:
            kinds = _wait_for_node(client, procs[-1], tmp / "node.log")
            plan, note = demo_plan(kinds)
            if note:
                console.print(f"[yellow]{note}[/yellow]")
            key = client.submit(plan)
            console.print(f"submitted {key}; node workdir {tmp / 'work'}")
            exp = client.experiment(key)
            with Live(_table(exp, {}), console=console, refresh_per_second=2) as live:
                while exp["state"] not in ("succeeded", "failed", "cancelled"):
                    if time.monotonic() - started > RUN_TIMEOUT_S:
                        raise ClientError(f"the demo did not finish within {RUN_TIMEOUT_S:.0f}s")
                    time.sleep(1.0)
                    exp = client.experiment(key)
                    live.update(_table(exp, _latest(client, exp)))
            metrics = {s["name"]: client.metrics(f"{key}/{s['name']}") for s in exp["stages"]}
            results = {
                "experiment": exp,
                "metrics": metrics,
                "artifacts": client.artifacts(key),
                "seconds": round(time.monotonic() - started, 1),
                "validity": validity(metrics),
            }
        _show(console, results, as_json)
        return 0 if exp["state"] == "succeeded" else 1
    except (ClientError, RuntimeError) as e:
        console.print(f"[red]infra demo: {e}[/red] (logs in {tmp})")
        keep = True
        return 1
    finally:
        for p in reversed(procs):
            stop(p)
        if keep:
            console.print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_node(client: Any, node: subprocess.Popen[Any], log: Path) -> set[str]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node agent exited; see {log}")
        nodes = [n for n in client.status()["nodes"] if n["online"]]
        if nodes:
            return set(nodes[0].get("stage_kinds", []))
        time.sleep(0.2)
    raise RuntimeError(f"the node did not register within {START_TIMEOUT_S:.0f}s; see {log}")


def validity(metrics: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """The evaluate stage's verdict on what was generated: ``{valid, count, rate}``, None if it did not report.
    The rate is the one number that says whether the model learnt the language of crystals."""
    rows = metrics.get("evaluate") or []
    values = rows[-1]["values"] if rows else {}
    rate, count = values.get("is_valid_rate"), values.get("count")
    if rate is None or not count:
        return None
    return {"valid": round(rate * count), "count": int(count), "rate": rate}


def _show(console: Any, results: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    from rich.table import Table

    exp = results["experiment"]
    for stage, rows in results["metrics"].items():
        if rows:
            vals = ", ".join(f"{k}={v:.4g}" for k, v in rows[-1]["values"].items() if v is not None)
            console.print(f"[bold]{stage}[/bold] final metrics (step {rows[-1]['step']}): {vals}")
    t = Table(title="artifacts (relative to the node's workdir)", title_justify="left")
    for col in ("stage", "kind", "path"):
        t.add_column(col)
    for a in results["artifacts"]:
        t.add_row(a["stage"], a["kind"], a["path"])
    console.print(t)
    console.print(f"{exp['experiment']} {exp['state']} in {results['seconds']:.0f}s")
    verdict = results["validity"]
    if verdict is not None:
        console.print(
            f"[bold]valid: {verdict['valid']} of {verdict['count']} evaluated structures ({verdict['rate']:.0%})"
            "[/bold]: formula, site multiplicities, bond lengths and space group consistent (docs/VALIDITY.md)"
        )
