"""Runs a plan through a real master and node agent on this machine, as a cluster would.

``start`` launches ``infra master`` (SQLite in WORK) and ``infra node`` (workdir WORK/node; its GPUs
come from NVML) as detached sessions, so they outlive the shell that started them, waits for the node
to register and submits the plan (external input paths resolved from the current directory, as
``infra submit`` does). ``wait`` follows the experiment for at most ``--timeout`` seconds; ``stop``
ends both processes. ``start`` and ``wait`` print ONE JSON line: the node as the master stored it (its
GPUs with their NVML facts), the experiment's state, and per stage its state, node, GPUs, seconds and
last metric values.

    python bench/cluster_plan.py start examples/perov5.json --work W
    python bench/cluster_plan.py wait --work W --timeout 500
    python bench/cluster_plan.py stop --work W
    python bench/cluster_plan.py start examples/perov5.json --work W --smoke   # CPU rehearsal

A rehearsal on a CPU machine needs a node that can run every stage of the plan (examples/perov5.json:
4 CPUs for train, the ``oid`` extra for analyze); otherwise ``wait`` shows the stages waiting and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.client import Client  # noqa: E402
from infra.spec.plan import resolve_inputs  # noqa: E402

FINISHED = ("succeeded", "failed", "cancelled")


def _spawn(work: Path, name: str, *args: str) -> None:
    env = {**os.environ, "INFRA_CONFIG_DIR": str(work / "config")}
    log = (work / f"{name}.log").open("w")
    cmd = [sys.executable, "-m", "infra.cli", *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    (work / f"{name}.pid").write_text(str(proc.pid))


def _summary(client: Client, key: str) -> dict[str, Any]:
    exp = client.experiment(key)
    stages = []
    for s in exp["stages"]:
        last = s["attempts"][-1] if s["attempts"] else {}
        began, ended = last.get("started_at"), last.get("finished_at")
        metrics = client.metrics(f"{key}/{s['name']}") if last else []
        values: dict[str, Any] = {}
        for row in metrics:  # the latest value of every metric the stage reported
            values.update({k: v for k, v in row["values"].items() if v is not None})
        stages.append(
            {
                "name": s["name"],
                "state": s["state"],
                "node": s["node"],
                "gpus": last.get("gpu_indices"),
                "attempts": len(s["attempts"]),
                "seconds": round(ended - began, 1) if began and ended else None,
                "reason": s["reason"] or None,
                "last_metrics": values,
            }
        )
    nodes = [
        {k: n.get(k) for k in ("name", "state", "gpus", "nvml", "cpu_count", "memory_mib", "extras", "software")}
        for n in client.status()["nodes"]
    ]
    return {"experiment": key, "state": exp["state"], "nodes": nodes, "stages": stages}


def start(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{args.port}"
    db = f"sqlite:///{work / 'master.db'}"
    _spawn(work, "master", "master", "--db", db, "--bind", address, "--heartbeat", str(args.heartbeat))
    node = ["node", "--master", address, "--workdir", str(work / "node"), "--name", args.name]
    if args.fake_gpus:
        node += ["--fake-gpus", str(args.fake_gpus)]
    _spawn(work, "node", *node, "--heartbeat", str(args.heartbeat))
    deadline = time.monotonic() + args.register_timeout
    with Client(address) as client:
        while True:
            try:
                if any(n["online"] for n in client.status()["nodes"]):
                    break
            except Exception:  # the master may not listen yet
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"no node registered within {args.register_timeout:.0f} s; see {work}/*.log")
            time.sleep(0.5)
        plan = resolve_inputs(json.loads(Path(args.plan).read_text()), Path.cwd())
        if args.smoke:
            plan["smoke"] = True
        key = client.submit(plan)
        (work / "experiment").write_text(key)
        return _summary(client, key)


def wait(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work).resolve()
    key = (work / "experiment").read_text()
    deadline = time.monotonic() + args.timeout
    with Client(f"127.0.0.1:{args.port}") as client:
        while client.experiment(key)["state"] not in FINISHED and time.monotonic() < deadline:
            time.sleep(2.0)
        return _summary(client, key)


def stop(args: argparse.Namespace) -> None:
    work = Path(args.work).resolve()
    for name in ("node", "master"):
        pid = work / f"{name}.pid"
        if pid.is_file():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid.read_text()), signal.SIGTERM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "wait", "stop"])
    ap.add_argument("plan", nargs="?", help="plan JSON (start)")
    ap.add_argument("--work", required=True, help="folder for the database, the node's workdir and the logs")
    ap.add_argument("--port", type=int, default=50561)
    ap.add_argument("--name", default="gpu-node")
    ap.add_argument("--heartbeat", type=float, default=2.0)
    ap.add_argument("--register-timeout", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=500.0, help="seconds to follow the experiment (wait)")
    ap.add_argument("--smoke", action="store_true", help="run the plan in smoke mode")
    ap.add_argument("--fake-gpus", type=int, default=0, help="the node advertises N fake GPUs (a rehearsal on a CPU)")
    args = ap.parse_args()
    if args.action == "stop":
        stop(args)
        return 0
    if args.action == "start" and not args.plan:
        ap.error("start needs a plan")
    out = start(args) if args.action == "start" else wait(args)
    print(json.dumps(out))
    return 0 if out["state"] != "failed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
