"""Soak test of the control plane: many simulated agents, agent kills, graceful stops, drains, a master restart.

Starts ``infra master`` on loopback (SQLite in a temporary directory, or a fresh PostgreSQL database that
is dropped afterwards) and, in this process, ``--nodes`` simulated agents speaking the real protocol over
real gRPC (grpc.aio). Each agent behaves like ``node/agent.py``: it registers listing the attempts it holds,
heartbeats, takes assignments from its command stream, reports RUNNING, and runs each stage as a task that
writes numbered events into the agent's spool; a sender delivers them in batches, then the final report
once every event is acknowledged. A killed agent loses its connections and tasks, but not its spool nor
its stage "processes" (as on a real node, where both live on disk and in their own sessions); it comes back
after a short pause (shorter than the lost timeout) or a long one (longer: the master re-queues its stages
and tells it to kill its copies when it returns).

``--stages`` short stages (0.5-3 s, 5-20 events each) are submitted at the start with retry budgets for the
machine's faults only (``node_lost`` and ``preempted``; ``error`` 0: no stage fails by its own doing, so any
attempt charged to ``error`` is a fault misclassified). An agent is killed (kill -9) every ``--kill-every``
seconds; another stops gracefully every ``--stop-every`` seconds (as ``infra node`` on SIGTERM: it says
``stopping`` in its heartbeats, refuses new assignments as ``preempted``, lets its stages finish within a
random deadline of 0-2 s, reports the rest failed with class ``preempted``, then comes back as a fresh
process); a node is drained every ``--drain-every`` seconds through the DrainNode RPC, half of the time with
a 1 s deadline after which the master preempts what still runs there, and undrained a few seconds later.
The master is killed (SIGKILL) once, when about 40% of the stages have ended, and restarted on the same port
and database. When every experiment has ended (or after ``--timeout``), the master's database is compared
with what the simulated stages wrote. Prints ONE JSON line:

    python bench/soak.py [--nodes 200] [--stages 2000] [--db sqlite|postgres] [--timeout 300]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.masterkit import postgres_database, start_master  # noqa: E402
from infra.protos import PROTOCOL_VERSION, infra_pb2, infra_pb2_grpc  # noqa: E402

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
NODES_PER_CHANNEL = 50
STAGES_PER_PLAN = 50
HEARTBEAT_S = 1.0
LOST_TIMEOUT_S = 5.0  # shorter than the default 60 s so that agents killed for longer move work within a run
MASTER_FLAGS = ("--heartbeat", str(HEARTBEAT_S), "--lost-timeout", str(LOST_TIMEOUT_S))


@dataclass(eq=False)
class Held:
    """An attempt an agent holds; lives on the agent's "disk" (survives a kill)."""

    attempt_id: int
    lease: str
    events: list[tuple[int, str]] = field(default_factory=list)  # (seq, text)
    acked: int = 0  # events acknowledged (a prefix)
    final: str | None = None
    started: bool = False
    process: asyncio.Task[None] | None = None


@dataclass
class Stats:
    kills: int = 0
    long_kills: int = 0
    stops: int = 0
    drains: int = 0
    drain_deadlines: int = 0
    master_restarts: int = 0
    written: dict[int, list[tuple[int, str]]] = field(default_factory=dict)  # attempt -> what its stage wrote


class SimAgent:
    def __init__(self, index: int, channel: grpc.aio.Channel, stats: Stats) -> None:
        self.node_id = f"soak-{index:04d}"
        self.stub = infra_pb2_grpc.NodeServiceStub(channel)
        self.stats = stats
        self.held: dict[int, Held] = {}
        self.session: int | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.alive = False
        self.stopping = ""  # non-empty during a graceful stop: sent as the heartbeat's `unavailable`
        self.wake = asyncio.Event()

    # --- life ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.alive = True
        self.stopping = ""
        self.session = None
        self.tasks = [asyncio.ensure_future(self._main())]

    def kill(self) -> None:
        """kill -9 of the agent: connections and threads go, the spool and the stage processes stay."""
        self.alive = False
        for t in self.tasks:
            t.cancel()
        self.tasks = []

    async def _main(self) -> None:
        await self._register()
        for h in list(self.held.values()):  # restart: what was assigned but never started
            if not h.started:
                self._spawn(self._begin(h))
        self._spawn(self._heartbeats())
        self._spawn(self._commands())
        self._spawn(self._sender())

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    async def _retry(self, delay: float) -> float:
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        return min(delay * 2, 2.0)

    async def _register(self) -> int:
        delay = 0.2
        while True:
            running = [
                infra_pb2.RunningAttempt(attempt_id=h.attempt_id, lease_token=h.lease) for h in self.held.values()
            ]
            facts = infra_pb2.NodeFacts(name=self.node_id, hostname="soak", cpu_count=2, memory_mib=8192)
            facts.stage_kinds.append("evaluate")
            req = infra_pb2.RegisterRequest(
                protocol_version=PROTOCOL_VERSION, node_id=self.node_id, facts=facts, running=running
            )
            try:
                self.session = (await self.stub.Register(req, timeout=10)).session
                return self.session
            except grpc.aio.AioRpcError:
                delay = await self._retry(delay)

    async def _session(self) -> int:
        return self.session if self.session is not None else await self._register()

    # --- loops ---------------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """As the agent heartbeats: messages on one HeartbeatStream, the next only after the acknowledgement
        of the last; a stream that fails is opened again at the next heartbeat. A kill cancels this task,
        and with it the call (the master then only sees silence)."""
        beats: Any = None
        try:
            while True:
                await asyncio.sleep(HEARTBEAT_S * random.uniform(0.8, 1.0))
                session = await self._session()
                req = infra_pb2.HeartbeatRequest(node_id=self.node_id, session=session, unavailable=self.stopping)
                for h in self.held.values():
                    req.running.add(attempt_id=h.attempt_id, lease_token=h.lease)
                try:
                    beats = beats or self.stub.HeartbeatStream()
                    await beats.write(req)
                    resp = await asyncio.wait_for(beats.read(), 5)
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("the master ended the heartbeat stream")
                except (grpc.aio.AioRpcError, ConnectionError, asyncio.InvalidStateError, asyncio.TimeoutError):
                    if beats is not None:
                        beats.cancel()
                    beats = None
                    continue
                if resp.reregister:
                    self.session = None
                for attempt_id in resp.revoked:
                    self._revoke(attempt_id)
        finally:
            if beats is not None:
                beats.cancel()

    async def _commands(self) -> None:
        delay = 0.2
        while True:
            session = await self._session()
            try:
                call = self.stub.Assignments(infra_pb2.AssignmentStreamRequest(node_id=self.node_id, session=session))
                async for cmd in call:
                    delay = 0.2
                    if cmd.WhichOneof("command") == "assign":
                        a = cmd.assign
                        if a.attempt_id not in self.held:
                            self.held[a.attempt_id] = Held(a.attempt_id, a.lease_token)
                            if self.stopping:  # as the agent does: nothing new starts while it stops
                                self._preempt(self.held[a.attempt_id])
                            else:
                                self._spawn(self._begin(self.held[a.attempt_id]))
                    else:
                        self._revoke(cmd.cancel.attempt_id)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self.session = None
            delay = await self._retry(delay)

    async def _begin(self, h: Held) -> None:
        """Report RUNNING (the lease check), then start the stage's "process"."""
        rep = infra_pb2.StageStatusReport(
            node_id=self.node_id, attempt_id=h.attempt_id, lease_token=h.lease, state=infra_pb2.RUNNING
        )
        delay = 0.2
        while True:
            try:
                ack = await self.stub.ReportStatus(rep, timeout=10)
                break
            except grpc.aio.AioRpcError:
                delay = await self._retry(delay)
        if not ack.accepted:
            self.held.pop(h.attempt_id, None)
            return
        h.started = True
        h.process = asyncio.ensure_future(self._process(h))  # not the agent's: it survives a kill

    async def _process(self, h: Held) -> None:
        n, duration = random.randint(5, 20), random.uniform(0.5, 3.0)
        written = self.stats.written.setdefault(h.attempt_id, [])
        for i in range(n):
            await asyncio.sleep(duration / n)
            event = (len(h.events) + 1, f"attempt {h.attempt_id} event {i} {uuid.uuid4().hex[:8]}")
            h.events.append(event)
            written.append(event)
            self.wake.set()
        h.final = "succeeded"
        self.wake.set()

    async def stop(self, deadline: float) -> None:
        """A graceful stop: take nothing new, let the stages end within ``deadline`` seconds, preempt the rest,
        deliver every final report, then leave (the process ends; a new one starts later)."""
        self.stopping = "stopping: soak"
        end = time.monotonic() + deadline
        while time.monotonic() < end and any(h.final is None for h in self.held.values()):
            await asyncio.sleep(0.05)
        for h in list(self.held.values()):
            if h.final is None:
                self._preempt(h)
        self.wake.set()
        end = time.monotonic() + 15
        while self.held and time.monotonic() < end:  # the sender delivers the finals
            await asyncio.sleep(0.05)
        self.kill()

    def _preempt(self, h: Held) -> None:
        if h.process is not None:
            h.process.cancel()
        h.final = "preempted"
        self.wake.set()

    def _revoke(self, attempt_id: int) -> None:
        h = self.held.pop(attempt_id, None)
        if h is not None and h.process is not None:
            h.process.cancel()

    async def _sender(self) -> None:
        delay = 0.2
        while True:
            await asyncio.wait({asyncio.ensure_future(self.wake.wait())}, timeout=0.2)
            self.wake.clear()
            try:
                await self._send_events()
                await self._send_finals()
                delay = 0.2
            except grpc.aio.AioRpcError:
                delay = await self._retry(delay)

    async def _send_events(self) -> None:
        batch = infra_pb2.EventBatch(node_id=self.node_id)
        upto: dict[int, int] = {}
        for h in list(self.held.values()):
            for seq, text in h.events[h.acked :]:
                ev = batch.events.add(attempt_id=h.attempt_id, lease_token=h.lease, seq=seq, time=time.time())
                ev.log.stream, ev.log.text = "stdout", text
                upto[h.attempt_id] = seq
        if not upto:
            return
        ack = await self.stub.ReportEvents(batch, timeout=10)
        for attempt_id, seq in upto.items():
            if attempt_id in self.held:
                self.held[attempt_id].acked = max(self.held[attempt_id].acked, seq)
        for attempt_id in ack.rejected_attempts:
            self._revoke(attempt_id)

    async def _send_finals(self) -> None:
        for h in list(self.held.values()):
            if h.final is None or h.acked < len(h.events):
                continue
            rep = infra_pb2.StageStatusReport(
                node_id=self.node_id,
                attempt_id=h.attempt_id,
                lease_token=h.lease,
                state=infra_pb2.SUCCEEDED,
                last_seq=len(h.events),
            )
            if h.final == "preempted":
                rep.state, rep.failure_class, rep.exit_code = infra_pb2.FAILED, infra_pb2.FAILURE_PREEMPTED, -15
                rep.message = "stopped by a graceful agent stop"
            await self.stub.ReportStatus(rep, timeout=10)
            self.held.pop(h.attempt_id, None)


# --- the master --------------------------------------------------------------------------------


# --- the run -----------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, db_url: str, tmp: Path) -> dict[str, Any]:
    master, address = start_master(db_url, tmp, *MASTER_FLAGS)
    port = int(address.rsplit(":", 1)[1])
    stats = Stats()
    channels = [grpc.aio.insecure_channel(address) for _ in range(-(-args.nodes // NODES_PER_CHANNEL))]
    agents = [SimAgent(i, channels[i // NODES_PER_CHANNEL], stats) for i in range(args.nodes)]
    started = time.monotonic()
    try:
        for a in agents:
            a.start()
        client = infra_pb2_grpc.ClientServiceStub(channels[0])
        await _wait_nodes(client, args.nodes)
        keys = await _submit(client, args.stages)
        pending: set[asyncio.Task[None]] = set()
        next_kill = time.monotonic() + args.kill_every
        next_stop = time.monotonic() + args.stop_every
        next_drain = time.monotonic() + args.drain_every
        restarted = False
        while time.monotonic() - started < args.timeout:
            await asyncio.sleep(1.0)
            ended, running = await _progress(client, keys, address)
            if running is None:  # the master is away (restarting): keep going
                continue
            if not restarted and ended >= 0.4 * args.stages:
                master = await _restart_master(master, db_url, tmp, port)
                stats.master_restarts += 1
                restarted = True
            if running == 0:
                break
            while time.monotonic() >= next_kill:
                next_kill += args.kill_every
                pending.add(asyncio.ensure_future(_kill_one(agents, stats)))
            while time.monotonic() >= next_stop:
                next_stop += args.stop_every
                pending.add(asyncio.ensure_future(_stop_one(agents, stats)))
            while time.monotonic() >= next_drain:
                next_drain += args.drain_every
                pending.add(asyncio.ensure_future(_drain_one(client, agents, stats)))
        for t in pending:
            t.cancel()
        duration = time.monotonic() - started
    finally:
        for a in agents:
            a.kill()
            for h in a.held.values():
                if h.process is not None:
                    h.process.cancel()
        for c in channels:
            await c.close()
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(30)
        except subprocess.TimeoutExpired:
            master.kill()
    return {"duration_s": round(duration, 1), **verify(db_url, stats, args)}


async def _wait_nodes(client: Any, n: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = await client.GetStatus(infra_pb2.StatusRequest(limit=1), timeout=10)
            if sum(1 for x in status.nodes if x.online) >= n:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"not all {n} simulated nodes came online")


async def _submit(client: Any, stages: int) -> list[str]:
    keys = []
    for first in range(0, stages, STAGES_PER_PLAN):
        count = min(STAGES_PER_PLAN, stages - first)
        plan = {
            "name": f"soak{first // STAGES_PER_PLAN}",
            "shared_workdir": True,
            "stages": [
                {
                    "name": f"s{i}",
                    "kind": "evaluate",
                    "params": {"inputs": ["x"]},
                    "resources": {"cpus": 1, "memory": 256},
                    "retries": {"node_lost": 20, "preempted": 20, "infra": 0, "error": 0},
                }
                for i in range(count)
            ],
        }
        resp = await client.Submit(infra_pb2.SubmitRequest(plan_json=json.dumps(plan)), timeout=60)
        if resp.errors:
            raise SystemExit(f"plan rejected: {resp.errors[0]}")
        keys.append(resp.experiment)
    return keys


async def _progress(client: Any, keys: list[str], address: str) -> tuple[int, int | None]:
    """(stages ended, stages not ended); None while the master does not answer."""
    try:
        status = await client.GetStatus(infra_pb2.StatusRequest(limit=len(keys) + 10), timeout=10)
    except grpc.aio.AioRpcError:
        return 0, None
    terminal = {infra_pb2.SUCCEEDED, infra_pb2.FAILED, infra_pb2.CANCELLED}
    states = [s.state for e in status.experiments if e.experiment in keys for s in e.stages]
    ended = sum(1 for s in states if s in terminal)
    return ended, len(states) - ended


async def _restart_master(master: subprocess.Popen[str], db_url: str, tmp: Path, port: int) -> subprocess.Popen[str]:
    master.send_signal(signal.SIGKILL)
    master.wait(10)
    await asyncio.sleep(1.5)
    loop = asyncio.get_running_loop()
    proc, _ = await loop.run_in_executor(None, lambda: start_master(db_url, tmp, *MASTER_FLAGS, port=port))
    return proc


async def _kill_one(agents: list[SimAgent], stats: Stats) -> None:
    victims = [a for a in agents if a.alive]
    if not victims:
        return
    agent = random.choice(victims)
    agent.kill()
    stats.kills += 1
    if random.random() < 0.25:  # away for longer than the lost timeout: its stages move elsewhere
        stats.long_kills += 1
        await asyncio.sleep(random.uniform(LOST_TIMEOUT_S + 1, LOST_TIMEOUT_S + 4))
    else:
        await asyncio.sleep(random.uniform(0.3, 1.5))
    agent.start()


async def _stop_one(agents: list[SimAgent], stats: Stats) -> None:
    victims = [a for a in agents if a.alive and not a.stopping]
    if not victims:
        return
    agent = random.choice(victims)
    stats.stops += 1
    await agent.stop(random.uniform(0.0, 2.0))
    await asyncio.sleep(random.uniform(0.3, 1.5))
    agent.start()


async def _drain_one(client: Any, agents: list[SimAgent], stats: Stats) -> None:
    """Drain a node (half of the time with a 1 s deadline), undrain it a few seconds later."""
    agent = random.choice(agents)
    deadline = 1.0 if random.random() < 0.5 else 0.0
    try:
        await client.DrainNode(infra_pb2.DrainNodeRequest(node=agent.node_id, deadline_s=deadline), timeout=10)
    except grpc.aio.AioRpcError:
        return  # the master is away (restarting)
    stats.drains += 1
    stats.drain_deadlines += deadline > 0
    await asyncio.sleep(random.uniform(2.0, 4.0))
    for _ in range(20):  # undrain even across a master restart
        try:
            await client.DrainNode(infra_pb2.DrainNodeRequest(node=agent.node_id, undrain=True), timeout=10)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(1.0)


def verify(db_url: str, stats: Stats, args: argparse.Namespace) -> dict[str, Any]:
    """Compare the master's database with what the simulated stages wrote."""
    from sqlalchemy import create_engine, select

    from infra.master.models import Attempt, Event, Stage

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stages = conn.execute(select(Stage.id, Stage.state, Stage.reason)).all()
            attempts = conn.execute(select(Attempt.id, Attempt.stage_id, Attempt.state, Attempt.message)).all()
            classes = collections.Counter(c for (c,) in conn.execute(select(Attempt.failure_class)).all() if c)
            events = conn.execute(select(Event.attempt_id, Event.seq, Event.data)).all()
    finally:
        engine.dispose()
    stored: dict[int, dict[int, str]] = collections.defaultdict(dict)
    for attempt_id, seq, data in events:
        stored[attempt_id][seq] = data.get("text", "")
    succeeded_attempts = collections.Counter(sid for _, sid, state, _ in attempts if state == "succeeded")
    states = collections.Counter(state for _, state, _ in stages)
    failed_without_reason = sum(1 for _, state, reason in stages if state == "failed" and not reason)
    lost = duplicated = wrong = 0
    for attempt_id, _, state, _ in attempts:
        written = dict(stats.written.get(attempt_id, []))
        got = stored.get(attempt_id, {})
        wrong += sum(1 for seq, text in got.items() if written.get(seq) != text)
        texts = list(got.values())
        duplicated += len(texts) - len(set(texts))
        if state == "succeeded":
            lost += sum(1 for seq in written if seq not in got)

    def short(text: str) -> str:  # "node soak-0042 lost: no heartbeat for 3.4s" -> "node lost: no heartbeat"
        return " ".join(w for w in text.split(" for ")[0].split() if not w.startswith("soak-"))[:60]

    reasons = collections.Counter(short(reason.split(": ", 1)[-1]) for _, state, reason in stages if state == "failed")
    retries = collections.Counter(short(message) for _, _, state, message in attempts if state == "failed")
    return {
        "db": args.db,
        "nodes": args.nodes,
        "stages": len(stages),
        "succeeded": states.get("succeeded", 0),
        "failed": states.get("failed", 0),
        "failed_without_reason": failed_without_reason,
        "not_ended": sum(n for s, n in states.items() if s not in ("succeeded", "failed", "cancelled")),
        "stages_succeeded_twice": sum(1 for n in succeeded_attempts.values() if n > 1),
        "attempts": len(attempts),
        "retried_attempts": sum(retries.values()),
        "retry_reasons": dict(retries.most_common(3)),
        "attempt_classes": dict(classes),
        "error_class_attempts": classes.get("error", 0),
        "agent_kills": stats.kills,
        "agent_kills_past_lost_timeout": stats.long_kills,
        "graceful_stops": stats.stops,
        "drains": stats.drains,
        "drains_with_deadline": stats.drain_deadlines,
        "master_restarts": stats.master_restarts,
        "events_written": sum(len(v) for v in stats.written.values()),
        "events_stored": len(events),
        "events_lost": lost,
        "events_duplicated": duplicated,
        "events_wrong": wrong,
        "failure_reasons": dict(reasons.most_common(3)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--stages", type=int, default=2000)
    p.add_argument("--kill-every", type=float, default=1.5, help="seconds between agent kills")
    p.add_argument("--stop-every", type=float, default=2.0, help="seconds between graceful agent stops")
    p.add_argument("--drain-every", type=float, default=3.0, help="seconds between node drains")
    p.add_argument("--timeout", type=float, default=300.0, help="give up (and report) after this many seconds")
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--postgres-url", default=os.environ.get("INFRA_TEST_POSTGRES_URL", PG_DEFAULT))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    random.seed(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="infra-soak-"))
    drop = None
    db_url = f"sqlite:///{tmp / 'master.db'}"
    if args.db == "postgres":
        db_url, drop = postgres_database(args.postgres_url, "infra_soak")
    try:
        result = asyncio.run(soak(args, db_url, tmp))
    finally:
        if drop is not None:
            drop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    ok = (
        result["not_ended"] == 0
        and result["failed_without_reason"] == 0
        and result["stages_succeeded_twice"] == 0
        and result["error_class_attempts"] == 0
        and result["events_lost"] == result["events_duplicated"] == result["events_wrong"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
