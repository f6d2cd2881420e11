"""A large artifact fetched through the master while simulated nodes heartbeat.

Starts ``infra master`` (SQLite in a temporary directory) and one real node agent on loopback, runs a
one-stage experiment on it (the test stage kind ``probe``), writes a ``--mib`` MiB file of random bytes
into the record, then fetches it as ``infra artifacts --get`` does: the first call is cut after
``--cut`` of the bytes (the client closes the stream), the second resumes from the partial file and
checks the sha256 of the whole. Meanwhile ``--nodes`` simulated nodes (registered, command stream open)
heartbeat every second from another process; their heartbeat latency is measured before the transfer
(idle) and during it, and the master's resident memory is sampled. Prints ONE JSON line:

    python bench/artifact.py [--mib 200] [--nodes 200] [--cut 0.4]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.masterkit import start_master  # noqa: E402

STAGEKIT = ROOT / "tests" / "control" / "stagekit.py"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2)


async def _heartbeats(address: str, nodes: int, phase: Any, out: Any) -> None:
    """``nodes`` simulated nodes; latencies are kept per phase (``phase.value``: 0 setup, 1 idle, 2 transfer,
    3 done)."""
    import grpc

    from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, nodes // 100))]
    latencies: dict[int, list[float]] = {1: [], 2: []}

    async def node(i: int) -> None:
        stub = infra_pb2_grpc.NodeServiceStub(channels[i % len(channels)])
        node_id = f"sim-{i:05d}"
        facts = infra_pb2.NodeFacts(name=node_id, hostname="sim", cpu_count=4, memory_mib=16384)
        reg = await stub.Register(
            infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=node_id, facts=facts), timeout=60
        )
        stream = stub.Assignments(infra_pb2.AssignmentStreamRequest(node_id=node_id, session=reg.session))
        hb = infra_pb2.HeartbeatRequest(node_id=node_id, session=reg.session)
        await asyncio.sleep((i % 100) / 100)
        while phase.value < 3:
            t0 = time.perf_counter()
            await stub.Heartbeat(hb, timeout=10)
            if phase.value in latencies:
                latencies[phase.value].append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
        stream.cancel()

    await asyncio.gather(*(node(i) for i in range(nodes)))
    for c in channels:
        await c.close()
    out.put(latencies)


def _sim_process(address: str, nodes: int, phase: Any, out: Any) -> None:
    asyncio.run(_heartbeats(address, nodes, phase, out))


def _fetch(client: Any, key: str, path: str, dest: Path, size: int, cut: float) -> dict[str, float]:
    """Cut the first transfer after ``cut`` of the bytes (the client closes its stream), then resume."""
    from infra.protos import infra_pb2

    t0 = time.perf_counter()
    call = client.stub.GetArtifact(infra_pb2.GetArtifactRequest(experiment=key, path=path))
    with dest.open("wb") as fh:
        for m in call:
            fh.write(m.data)
            if fh.tell() >= cut * size:
                call.cancel()
                break
    t1 = time.perf_counter()
    result = client.fetch_artifact(key, path, dest)
    t2 = time.perf_counter()
    return {"first_s": t1 - t0, "resume_s": t2 - t1, "resumed_from": result["resumed_from"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=200, help="size of the artifact")
    p.add_argument("--nodes", type=int, default=200, help="simulated nodes heartbeating every second")
    p.add_argument("--cut", type=float, default=0.4, help="fraction of the bytes after which the first call closes")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of heartbeats measured before the transfer")
    args = p.parse_args()

    import psutil

    from infra.client import Client

    tmp = Path(tempfile.mkdtemp(prefix="infra-bench-artifact-"))
    master, address = start_master(f"sqlite:///{tmp / 'master.db'}", tmp, "--heartbeat", "1")
    env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp), "INFRA_STAGE_MODULES": str(STAGEKIT)}
    workdir = tmp / "work"
    agent = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "node", "--master", address, "--name", "holder", "--workdir", str(workdir)]
        + ["--fake-gpus", "0", "--heartbeat", "1", "--cpus", "1", "--memory", "2GiB"],
        stdout=(tmp / "node.log").open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    phase: Any = mp.Value("i", 0)
    results: Any = mp.Queue()
    sim = mp.Process(target=_sim_process, args=(address, args.nodes, phase, results))
    try:
        with Client(address) as client:
            deadline = time.monotonic() + 120
            while not any(n["online"] for n in client.status()["nodes"]):  # the master takes kinds nodes offer
                if time.monotonic() > deadline:
                    raise SystemExit("the node agent did not register: see its log")
                time.sleep(0.5)
            key = client.submit({"name": "big", "stages": [{"name": "p", "kind": "probe", "params": {"metrics": 1}}]})
            exp = client.wait(key, timeout=120, poll=0.5)
            if exp["state"] != "succeeded":
                raise SystemExit(f"the stage did not succeed: {exp['stages'][0]['reason']}")
            source = workdir / "experiments" / key / "artifacts" / "big.bin"
            with source.open("wb") as fh:
                for _ in range(args.mib):
                    fh.write(os.urandom(1 << 20))
            size = source.stat().st_size
            sim.start()
            time.sleep(2.0 + args.nodes / 200)  # registrations
            phase.value = 1
            time.sleep(args.idle)
            mproc, peak = psutil.Process(master.pid), [0]
            rss_before = mproc.memory_info().rss

            def sample() -> None:
                while phase.value == 2:
                    peak[0] = max(peak[0], mproc.memory_info().rss)
                    time.sleep(0.05)

            phase.value = 2
            sampler = threading.Thread(target=sample)
            sampler.start()
            dest = tmp / "fetched.bin"
            times = _fetch(client, key, "artifacts/big.bin", dest, size, args.cut)
            phase.value = 3
            sampler.join()
            same = hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()
        latencies = results.get(timeout=60)
        total_s = times["first_s"] + times["resume_s"]
        print(
            json.dumps(
                {
                    "bytes": size,
                    "identical": same,
                    "cut_at": times["resumed_from"],
                    "seconds": round(total_s, 2),
                    "mib_per_s": round(size / (1 << 20) / total_s, 1),
                    "resume_mib_per_s": round((size - times["resumed_from"]) / (1 << 20) / times["resume_s"], 1),
                    "nodes": args.nodes,
                    "heartbeat_idle_p50_ms": _percentile(latencies[1], 0.5),
                    "heartbeat_idle_p99_ms": _percentile(latencies[1], 0.99),
                    "heartbeat_transfer_p50_ms": _percentile(latencies[2], 0.5),
                    "heartbeat_transfer_p99_ms": _percentile(latencies[2], 0.99),
                    "heartbeats_during_transfer": len(latencies[2]),
                    "heartbeat_transfer_mean_ms": round(statistics.fmean(latencies[2]), 2) if latencies[2] else None,
                    "master_rss_mib_before": round(rss_before / (1 << 20), 1),
                    "master_rss_mib_peak": round(peak[0] / (1 << 20), 1),
                }
            )
        )
    finally:
        phase.value = 3
        if sim.is_alive():
            sim.join(15)
        for proc in (agent, master):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
