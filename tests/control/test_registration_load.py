"""Nodes registering under load stay registered: a slow registration commit costs a node none of its lost
timeout, and the load bench's simulated nodes keep the master's heartbeat contract (a real master, on
loopback, SQLite and PostgreSQL)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from infra.node.agent import Beats
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc

from .conftest import Cluster

BENCH = Path(__file__).resolve().parents[2] / "bench" / "master_load.py"
HEARTBEAT = 0.5  # the master declares a node lost after 3 intervals: 1.5 s


@contextlib.contextmanager
def _writes_blocked(db_url: str) -> Iterator[None]:
    """Holds a lock that makes the master's commit of a registration wait until the block ends."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        conn = sqlite3.connect(url.database or "", isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the database's write lock; the master waits (busy timeout)
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    engine = create_engine(url)
    try:
        with engine.begin() as pg:
            pg.execute(text("LOCK TABLE nodes IN EXCLUSIVE MODE"))  # reads pass, the node's insert waits
            yield
    finally:
        engine.dispose()


def _node_request(name: str) -> infra_pb2.RegisterRequest:
    facts = infra_pb2.NodeFacts(name=name, hostname="sim", cpu_count=4, memory_mib=8192, stage_kinds=["evaluate"])
    return infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=name, facts=facts)


def test_a_slow_registration_commit_does_not_count_against_the_lost_timeout(cluster: Cluster) -> None:
    """A node can heartbeat only once it has its session, i.e. once its registration is committed; when
    that commit waits longer than the lost timeout (a burst of 1,000 registrations on PostgreSQL took up
    to 2 s), the node answering at once must not be found lost already."""
    cluster.start_master(heartbeat=HEARTBEAT)
    with grpc.insecure_channel(cluster.address) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        with _writes_blocked(cluster.db_url):
            reply = stub.Register.future(_node_request("slow-commit"), timeout=30)
            time.sleep(3 * HEARTBEAT + 1.5)  # the lost timeout and more than one lost-node check
            assert not reply.done(), "the registration did not wait for its commit"
        session = reply.result(timeout=30).session
        beats = Beats(stub)
        try:
            beat = beats.send(infra_pb2.HeartbeatRequest(node_id="slow-commit", session=session), timeout=10)
        finally:
            beats.close()
        assert not beat.reregister, "the master declared the node lost while its registration was being committed"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("master_load", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _states(cluster: Cluster) -> dict[str, str]:
    return {n["name"]: n["state"] for n in cluster.status()["nodes"]}


def _plan(name: str, stages: int) -> dict[str, Any]:
    stage = {"kind": "evaluate", "params": {"inputs": ["x"]}, "resources": {"cpus": 1, "memory": 512}}
    return {"name": name, "shared_workdir": True, "stages": [{"name": f"s{i}", **stage} for i in range(stages)]}


def test_the_load_bench_nodes_stay_registered_while_it_waits_and_return_after_a_master_restart(
    cluster: Cluster,
) -> None:
    """bench/master_load.py starts measuring once all its nodes registered, seconds after the first did (more
    than the lost timeout for 1,000 nodes): nodes silent until then were all lost, and never registered
    again, so not one stage was dispatched. Like agents, they heartbeat from registration on and register
    again when the master no longer knows them."""
    cluster.start_master(heartbeat=HEARTBEAT)
    names = [f"sim-{i:05d}" for i in range(3)]
    args = argparse.Namespace(heartbeat=HEARTBEAT, warmup=0.0, duration=120.0, rate=10.0, batch=5, register_timeout=30)
    start_at = time.time() + 2 * 3 * HEARTBEAT  # the wait for registrations: twice the lost timeout
    bench = _bench()
    shared = bench.Shared()
    shared.measure_from.value = start_at
    loop = asyncio.new_event_loop()
    load = loop.create_task(bench._load(cluster.address, 0, len(names), args, False, shared))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(load)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        time.sleep(max(0.0, start_at + HEARTBEAT - time.time()))
        assert _states(cluster) == dict.fromkeys(names, "online")
        assert cluster.wait_finished(cluster.submit(_plan("before", 6)), timeout=30)["state"] == "succeeded"

        cluster.kill_master()
        cluster.restart_master()
        cluster.wait_for(lambda: _states(cluster) == dict.fromkeys(names, "online"), 30, "the nodes to register again")
        assert cluster.wait_finished(cluster.submit(_plan("after", 6)), timeout=30)["state"] == "succeeded"
    finally:
        loop.call_soon_threadsafe(load.cancel)
        thread.join(30)
        assert not thread.is_alive(), "the simulated nodes did not stop"
        loop.close()


def _facts(name: str, memory_mib: int, gpus: int) -> infra_pb2.NodeFacts:
    facts = infra_pb2.NodeFacts(name=name, hostname="sim", cpu_count=4, memory_mib=memory_mib, stage_kinds=["evaluate"])
    for i in range(gpus):
        facts.gpus.add(index=i, uuid=f"GPU-{name}-{i}", name="sim", memory_mib=1024)
    return facts


async def _register_all(address: str, facts: list[infra_pb2.NodeFacts]) -> list[int]:
    """Every registration at once, as nodes do when their master restarts; their sessions, in order."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        calls = [
            stub.Register(
                infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id=f.name, facts=f), timeout=60
            )
            for f in facts
        ]
        return [reply.session for reply in await asyncio.gather(*calls)]


def test_a_burst_of_registrations_is_acknowledged_and_persisted_in_full(cluster: Cluster) -> None:
    """Hundreds of nodes register at once, twice (the second burst as after a master restart: the known nodes
    with new facts, among new ones): every call is answered, every node's row and GPU rows say what its last
    registration said, a known node keeps when it first registered, and every session heartbeats."""
    cluster.start_master()
    first = [_facts(f"burst-{i:03d}", 8192, i % 3) for i in range(300)]
    sessions = asyncio.run(_register_all(cluster.address, first))
    assert len(set(sessions)) == len(first) and 0 not in sessions
    engine = create_engine(cluster.db_url)
    try:
        with engine.connect() as db:
            registered_at = dict(db.execute(text("SELECT id, registered_at FROM nodes")).all())
        assert set(registered_at) == {f.name for f in first}

        second = [_facts(f.name, 16384, 2 - i % 3) for i, f in enumerate(first)]
        second += [_facts(f"burst-{i:03d}", 4096, 1) for i in range(300, 400)]
        sessions = asyncio.run(_register_all(cluster.address, second))
        with engine.connect() as db:
            rows = {r.id: r for r in db.execute(text("SELECT id, memory_mib, registered_at FROM nodes"))}
            gpus = db.execute(text("SELECT node_id, uuid FROM gpus")).all()
    finally:
        engine.dispose()
    assert {n: r.memory_mib for n, r in rows.items()} == {f.name: f.memory_mib for f in second}
    assert {n: rows[n].registered_at for n in registered_at} == registered_at
    assert sorted(gpus) == sorted((f.name, g.uuid) for f in second for g in f.gpus)
    with grpc.insecure_channel(cluster.address) as channel:
        stub = infra_pb2_grpc.NodeServiceStub(channel)
        for f, session in zip(second, sessions, strict=True):
            beat = stub.Heartbeat(infra_pb2.HeartbeatRequest(node_id=f.name, session=session), timeout=10)
            assert not beat.reregister, f"{f.name}: its session is unknown to the master"
