"""Load test of one master: N simulated nodes heartbeating plus a steady stream of stages.

Starts ``infra master`` (SQLite in a temporary directory, or a fresh PostgreSQL database that is
dropped afterwards) on loopback, then from several load processes (grpc.aio) registers N nodes at once,
as after a master restart (a refused or timed-out registration is retried with the agent's backoff),
opens each node's assignment stream, heartbeats every ``--heartbeat`` seconds at a random phase from
registration on, as messages on the node's own ``HeartbeatStream`` (a heartbeat's latency: from writing it
to reading its acknowledgement; registering again, counted, if the master lost the node), and, once every node is
registered, submits plans of independent stages at a target rate. A simulated node reports each
assignment succeeded at once. Measures for ``--duration`` seconds after the last registration plus
``--warmup``; prints ONE JSON line, with ``registration_s``: from the start of the load processes until
every node's first registration was acknowledged:

    python bench/master_load.py [--nodes 1000] [--heartbeat 1] [--duration 20] [--db sqlite|postgres]
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
NODES_PER_PROCESS = 2000  # one load process's loop keeps up with this many nodes' calls
REGISTER_TIMEOUT_S = 10.0  # the node agent's deadline for one registration call


class Shared:
    """What the load processes and the parent share: how many nodes have registered, and when measuring
    starts (0 until every node registered; then the last registration plus the warm-up)."""

    def __init__(self) -> None:
        self.registered = mp.Value("i", 0)
        self.measure_from = mp.Value("d", 0.0)


def _stages(n: int) -> list[dict[str, Any]]:
    res = {"gpus": 0, "cpus": 1, "memory": 512}
    return [{"name": f"s{i}", "kind": "evaluate", "params": {"inputs": ["x"]}, "resources": res} for i in range(n)]


async def _load(
    address: str, first: int, count: int, args: argparse.Namespace, submit: bool, shared: Shared
) -> dict[str, Any]:
    """One load process: ``count`` simulated nodes (and the submitter when ``submit``)."""
    import grpc

    from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, count // NODES_PER_CHANNEL))]
    latencies: list[float] = []
    counts = {
        "dispatched": 0,
        "succeeded": 0,
        "submitted": 0,
        "errors": 0,
        "reregistrations": 0,
        "register_retries": 0,
    }

    def measuring() -> bool:
        start = shared.measure_from.value
        return 0 < start <= time.time()

    def running() -> bool:
        start = shared.measure_from.value
        return start == 0 or time.time() < start + args.duration

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
                    if measuring():
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
            """As the agent registers: retried with jittered exponential backoff until it is acknowledged."""
            nonlocal stream
            delay = 0.25
            while True:
                try:
                    hb.session = (await stub.Register(req, timeout=REGISTER_TIMEOUT_S)).session
                    break
                except grpc.RpcError:
                    counts["register_retries"] += 1
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 5.0)
            if stream is not None:
                stream.cancel()
            stream = asyncio.ensure_future(commands(hb.session))

        await register()
        with shared.registered.get_lock():
            shared.registered.value += 1
        await asyncio.sleep(random.random() * args.heartbeat)
        beats: Any = None  # the node's open HeartbeatStream call; reopened at the next beat when it breaks
        while running():
            t0 = time.perf_counter()
            hb.seq += 1
            try:
                beats = beats or stub.HeartbeatStream()
                await beats.write(hb)
                resp = await beats.read()  # its acknowledgement: the latency is from the write to here
                if resp is grpc.aio.EOF or resp.seq != hb.seq:
                    raise ConnectionError("the master ended the heartbeat stream")
            except (grpc.RpcError, ConnectionError, asyncio.InvalidStateError):  # the last: written after it ended
                counts["errors"] += 1
                if beats is not None:
                    beats.cancel()
                resp, beats = None, None
            if measuring():
                latencies.append((time.perf_counter() - t0) * 1000)
            if resp is not None and resp.reregister:
                counts["reregistrations"] += 1
                await register()
            await asyncio.sleep(max(0.0, args.heartbeat - (time.perf_counter() - t0)))
        if beats is not None:
            beats.cancel()
        if stream is not None:
            stream.cancel()

    async def submitter() -> None:
        stub = infra_pb2_grpc.ClientServiceStub(channels[0])
        while shared.measure_from.value == 0:  # stages come once every node is registered
            await asyncio.sleep(0.1)
        interval = args.batch / args.rate
        n = 0
        while running():
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
        limit = args.register_timeout + args.warmup + args.duration + 120
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=limit)
    finally:
        for c in channels:
            await c.close()
    return {"latencies": latencies, **counts}


def _load_process(
    address: str, first: int, count: int, args: argparse.Namespace, submit: bool, shared: Shared, out: Any
) -> None:
    out.put(asyncio.run(_load(address, first, count, args, submit, shared)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (after --warmup)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the last registration before measuring")
    p.add_argument(
        "--register-timeout", type=float, default=120.0, help="seconds the registrations may take before the run fails"
    )
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--postgres-url", default=os.environ.get("INFRA_TEST_POSTGRES_URL", PG_DEFAULT))
    p.add_argument("--rate", type=float, default=300.0, help="stages submitted per second")
    p.add_argument("--batch", type=int, default=50, help="independent stages per submitted plan")
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between a node's heartbeats")
    p.add_argument("--procs", type=int, default=0, help=f"load processes (0: one per {NODES_PER_PROCESS} nodes)")
    args = p.parse_args()
    args.procs = args.procs or -(-args.nodes // NODES_PER_PROCESS)

    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="infra-bench-"))
    drop = None
    db_url = f"sqlite:///{tmp / 'master.db'}"
    if args.db == "postgres":
        db_url, drop = postgres_database(args.postgres_url, "infra_bench")
    # the master expects the simulated nodes' interval (its lost timeout is a number of them)
    master, address = start_master(db_url, tmp, "--heartbeat", str(args.heartbeat))
    procs: list[Any] = []
    try:
        mproc = psutil.Process(master.pid)
        shared, out = Shared(), mp.Queue()
        per = -(-args.nodes // args.procs)
        started = time.time()
        for k in range(args.procs):
            first, count = k * per, min(per, args.nodes - k * per)
            procs.append(mp.Process(target=_load_process, args=(address, first, count, args, k == 0, shared, out)))
            procs[-1].start()
        while shared.registered.value < args.nodes:
            if time.time() - started > args.register_timeout:
                raise SystemExit(
                    f"only {shared.registered.value} of {args.nodes} nodes registered in {args.register_timeout:g}s"
                )
            time.sleep(0.05)
        registration_s = time.time() - started
        shared.measure_from.value = time.time() + args.warmup
        time.sleep(args.warmup)
        mproc.cpu_percent(None)
        t0 = time.monotonic()
        results = [out.get(timeout=args.duration + 180) for _ in procs]
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
                "load_processes": args.procs,
                "registration_s": round(registration_s, 1),
                "duration_s": round(elapsed, 1),
                "heartbeats": len(lat),
                "heartbeat_p50_ms": round(q[49], 2),
                "heartbeat_p99_ms": round(q[98], 2),
                "heartbeat_p999_ms": round(statistics.quantiles(lat, n=1000)[998], 2) if len(lat) > 1 else None,
                "heartbeat_max_ms": round(max(lat), 2) if lat else None,
                "stages_submitted": sum(r["submitted"] for r in results),
                "stages_dispatched": dispatched,
                "dispatched_per_s": round(dispatched / args.duration, 1),
                "stages_succeeded": sum(r["succeeded"] for r in results),
                "rpc_errors": sum(r["errors"] for r in results),
                "reregistrations": sum(r["reregistrations"] for r in results),
                "register_retries": sum(r["register_retries"] for r in results),
                "master_cpu_percent": round(cpu, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
