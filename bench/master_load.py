"""Load test of one master: N simulated nodes heartbeating plus a steady stream of stages.

Starts ``infra master`` (SQLite in a temporary directory, or a fresh PostgreSQL database that is
dropped afterwards) on loopback, then from one or a few load processes (grpc.aio) registers N nodes,
opens each node's assignment stream, heartbeats every second at a random phase from registration on
(registering again, counted, if the master lost the node), and submits plans of independent stages at
a target rate. A simulated node reports each assignment succeeded at once. Bounded by ``--duration``;
prints ONE JSON line:

    python bench/master_load.py [--nodes 1000] [--duration 20] [--db sqlite|postgres] [--rate 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.masterkit import postgres_database, start_master  # noqa: E402

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
NODES_PER_CHANNEL = 100


def _stages(n: int) -> list[dict[str, Any]]:
    res = {"gpus": 0, "cpus": 1, "memory": 512}
    return [{"name": f"s{i}", "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": res} for i in range(n)]


async def _load(
    address: str, first: int, count: int, args: argparse.Namespace, submit: bool, start_at: float
) -> dict[str, Any]:
    """One load process: ``count`` simulated nodes (and the submitter when ``submit``)."""
    import grpc

    from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, count // NODES_PER_CHANNEL))]
    latencies: list[float] = []
    counts = {"dispatched": 0, "succeeded": 0, "submitted": 0, "errors": 0, "reregistrations": 0}
    measure_from = start_at + args.warmup
    end = start_at + args.warmup + args.duration

    async def node(i: int) -> None:
        """Behaves as an agent does towards the master: heartbeats from registration on (registering
        1,000 nodes takes longer than the lost timeout, so a node silent until measuring starts is lost),
        and registers again, reopening its command stream, when the master no longer knows its session."""
        stub = infra_pb2_grpc.NodeServiceStub(channels[i % len(channels)])
        node_id = f"sim-{first + i:05d}"
        facts = infra_pb2.NodeFacts(
            name=node_id, hostname="sim", cpu_count=4, memory_mib=16384, stage_kinds=["evaluate"]
        )
        req = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=node_id, facts=facts)
        hb = infra_pb2.HeartbeatRequest(node_id=node_id)
        hb.usage.cpu_percent, hb.usage.memory_total_mib = 10.0, 16384
        stream: asyncio.Future[None] | None = None

        async def commands(session: int) -> None:
            call = stub.Assignments(infra_pb2.AssignmentStreamRequest(node_id=node_id, session=session))
            try:
                async for cmd in call:
                    if cmd.WhichOneof("command") != "assign":
                        continue
                    a = cmd.assign
                    if time.time() >= measure_from:
                        counts["dispatched"] += 1
                    rep = infra_pb2.StageStatusReport(
                        node_id=node_id, attempt_id=a.attempt_id, lease_token=a.lease_token, state=infra_pb2.SUCCEEDED
                    )
                    try:
                        await stub.ReportStatus(rep, timeout=30)
                    except grpc.RpcError:
                        counts["errors"] += 1
                        continue
                    counts["succeeded"] += 1
            except grpc.RpcError:
                pass  # the master dropped the session or went away: a heartbeat says whether to register again

        async def register() -> None:
            nonlocal stream
            hb.session = (await stub.Register(req, timeout=60)).session
            if stream is not None:
                stream.cancel()
            stream = asyncio.ensure_future(commands(hb.session))

        await register()
        await asyncio.sleep(random.random() * args.heartbeat)
        while time.time() < end:
            t0 = time.perf_counter()
            try:
                resp = await stub.Heartbeat(hb, timeout=10)
            except grpc.RpcError:
                counts["errors"] += 1
                resp = None
            if time.time() >= measure_from:
                latencies.append((time.perf_counter() - t0) * 1000)
            if resp is not None and resp.reregister:
                counts["reregistrations"] += 1
                try:
                    await register()
                except grpc.RpcError:
                    counts["errors"] += 1
            await asyncio.sleep(max(0.0, args.heartbeat - (time.perf_counter() - t0)))
        if stream is not None:
            stream.cancel()

    async def submitter() -> None:
        stub = infra_pb2_grpc.ClientServiceStub(channels[0])
        await asyncio.sleep(max(0.0, start_at - time.time()))
        interval = args.batch / args.rate
        n = 0
        while time.time() < end:
            t0 = time.perf_counter()
            plan = {"name": f"load{n}", "shared_workdir": True, "stages": _stages(args.batch)}
            resp = await stub.Submit(infra_pb2.SubmitRequest(plan_json=json.dumps(plan)), timeout=30)
            if resp.errors:
                raise RuntimeError(f"plan rejected: {resp.errors[0]}")
            counts["submitted"] += args.batch
            n += 1
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)))

    tasks = [asyncio.ensure_future(node(i)) for i in range(count)]
    if submit:
        tasks.append(asyncio.ensure_future(submitter()))
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.warmup + args.duration + 120)
    finally:
        for c in channels:
            await c.close()
    return {"latencies": latencies, **counts}


def _load_process(
    address: str, first: int, count: int, args: argparse.Namespace, submit: bool, start_at: float, out: Any
) -> None:
    out.put(asyncio.run(_load(address, first, count, args, submit, start_at)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (after --warmup)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after registration before measuring")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--postgres-url", default=os.environ.get("INFRA_TEST_POSTGRES_URL", PG_DEFAULT))
    p.add_argument("--rate", type=float, default=300.0, help="stages submitted per second")
    p.add_argument("--batch", type=int, default=50, help="independent stages per submitted plan")
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between a node's heartbeats")
    p.add_argument("--procs", type=int, default=1, help="load processes the simulated nodes are spread over")
    args = p.parse_args()

    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="infra-bench-"))
    drop = None
    db_url = f"sqlite:///{tmp / 'master.db'}"
    if args.db == "postgres":
        db_url, drop = postgres_database(args.postgres_url, "infra_bench")
    # the master expects the simulated nodes' interval: it declares a node lost after three of them
    master, address = start_master(db_url, tmp, "--heartbeat", str(args.heartbeat))
    procs: list[Any] = []
    try:
        mproc = psutil.Process(master.pid)
        # registrations take a moment for 1,000 nodes; measuring starts after them plus the warm-up
        start_at = time.time() + 2.0 + args.nodes / 500
        out: Any = mp.Queue()
        per = -(-args.nodes // args.procs)
        for k in range(args.procs):
            first, count = k * per, min(per, args.nodes - k * per)
            procs.append(mp.Process(target=_load_process, args=(address, first, count, args, k == 0, start_at, out)))
            procs[-1].start()
        time.sleep(max(0.0, start_at + args.warmup - time.time()))
        mproc.cpu_percent(None)
        t0 = time.monotonic()
        results = [out.get(timeout=args.warmup + args.duration + 180) for _ in procs]
        cpu = mproc.cpu_percent(None)
        elapsed = time.monotonic() - t0
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        master.terminate()
        try:
            master.wait(20)
        except subprocess.TimeoutExpired:
            master.kill()
        if drop is not None:
            drop()
        shutil.rmtree(tmp, ignore_errors=True)
    lat = sorted(x for r in results for x in r["latencies"])
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [float("nan")] * 99
    dispatched = sum(r["dispatched"] for r in results)
    print(
        json.dumps(
            {
                "db": args.db,
                "nodes": args.nodes,
                "duration_s": round(elapsed, 1),
                "heartbeats": len(lat),
                "heartbeat_p50_ms": round(q[49], 2),
                "heartbeat_p99_ms": round(q[98], 2),
                "stages_submitted": sum(r["submitted"] for r in results),
                "stages_dispatched": dispatched,
                "dispatched_per_s": round(dispatched / args.duration, 1),
                "stages_succeeded": sum(r["succeeded"] for r in results),
                "rpc_errors": sum(r["errors"] for r in results),
                "reregistrations": sum(r["reregistrations"] for r in results),
                "master_cpu_percent": round(cpu, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
