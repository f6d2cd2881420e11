"""The master's controller: composes the parts that keep the cluster, and runs their loops.

Runs on the server's asyncio loop. The parts share one :class:`~master.state.ClusterState` and are
given what else they need explicitly, so none holds a reference back to this object:

- :class:`~master.lifecycle.StageMachine`: the stage state machine (transitions, retry budgets,
  the cascade, experiment state), memory only;
- :class:`~master.journal.Journal`: commits through the single writer thread and reads in a pool, and
  reading an experiment back when a change of it could not be recorded;
- :class:`~master.nodes.NodeRegistry`: registration, heartbeats, lost nodes, drains, command streams;
- :class:`~master.scheduler.Scheduler`: placement and waiting reasons;
- :class:`~master.intake.Intake`: status reports and events, fenced by lease;
- :class:`~master.experiments.Experiments`: submit, cancel, rerun;
- :class:`~master.metrics.Metrics`: the Prometheus registry (fed by the writer's commits and the servicers).
- :class:`~master.artifacts.ArtifactRelay`: files of experiment records, from their node to a client.

Every change becomes a :class:`~master.store.Changes` unit committed by the writer thread, in order;
a reply that acknowledges a change is sent only once the change is committed. No protobuf here: the
servicers translate (``master/service.py``, ``master/wire.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from infra.master import store
from infra.master.artifacts import ArtifactRelay
from infra.master.config import ControllerOptions
from infra.master.errors import NotFound, Refused
from infra.master.experiments import Experiments
from infra.master.intake import Intake
from infra.master.journal import Journal
from infra.master.lifecycle import StageMachine
from infra.master.metrics import Metrics
from infra.master.nodes import NodeRegistry
from infra.master.scheduler import Scheduler
from infra.master.state import AttemptRt, ClusterState, ExperimentRt, NodeRt, StageRt
from infra.master.store import Changes
from infra.master.writer import Writer

log = logging.getLogger("infra.master")
T = TypeVar("T")
__all__ = ["Controller", "NotFound", "Refused"]  # the errors were defined here once: importers keep working


class Controller:
    def __init__(
        self,
        engine: Engine,
        options: ControllerOptions | None = None,
        *,
        usage_row: Callable[[Any], Any] = lambda usage: usage,
    ) -> None:
        """``usage_row`` turns a node's usage as heartbeats bring it into what is stored (in the writer
        thread); the servicers' heartbeats bring messages (``master.wire.usage_row``)."""
        options = options or ControllerOptions()
        self.engine = engine
        self.options = options
        self.state = ClusterState()
        self.metrics = Metrics(self.state, node_state=lambda node: self.registry.node_state(node))
        self.writer = Writer(engine, on_commit=self.metrics.committed)
        self.readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="db-read")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.machine = StageMachine(self.state, wake=self.wake, forgotten=self._forgotten)
        self.journal = Journal(self.state, self.machine, writer=self.writer, readers=self.readers, wake=self.wake)
        parts = (self.state, self.machine, self.journal)
        self.registry = NodeRegistry(*parts, options=options, wake=self.wake, usage_row=usage_row)
        self.scheduler = Scheduler(*parts, wake=self.wake, ports=options.rendezvous_ports)
        self.intake = Intake(*parts, engine=engine, heard_from=self.registry.heard_from)
        self.submissions = Experiments(*parts, engine=engine, wake=self.wake)
        self.artifacts = ArtifactRelay(
            self.state,
            engine=engine,
            read=self.read,
            node_state=self.registry.node_state,
            max_bytes=options.artifact_max_bytes,
        )

    def _forgotten(self, exp: ExperimentRt) -> None:
        self.scheduler.forget(exp)

    # --- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        snap = await self.read(store.load_snapshot, self.engine)
        self.state.ids = dict(snap.max_ids)
        self.registry.restore(snap.nodes)
        repairs = Changes()
        self.machine.restore(snap, repairs, time.time())
        if repairs:
            await self.commit(repairs)
        self.registry.started = time.time()
        self._tasks = [
            asyncio.create_task(self._schedule_loop()),
            asyncio.create_task(self._persist_loop()),
            asyncio.create_task(self._monitor_loop()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.flush_heartbeats()
        self.writer.close()
        self.readers.shutdown(wait=False)

    async def _schedule_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.002)  # let a burst of reports coalesce into one pass
            try:
                self.scheduler.schedule()
            except Exception:
                log.exception("scheduling pass failed")

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.persist_interval)
            try:
                await self.registry.flush_heartbeats()
            except Exception as e:  # the next round retries; a lost usage sample is harmless
                log.warning("could not persist heartbeats: %s", e)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.registry.lost_timeout / 4))
            try:
                await self.registry.check_nodes()
            except Exception:
                log.exception("lost-node check failed")

    # --- what the servicers and the authenticator use -------------------------------------------

    def wake(self) -> None:
        """Ask for a scheduling pass (passes asked for together run once)."""
        self._wake.set()

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.journal.read(fn, *args)

    async def commit(self, unit: Callable[[Session], T] | Changes) -> T:
        return await self.journal.commit(unit)

    @property
    def nodes(self) -> dict[str, NodeRt]:
        return self.state.nodes

    @property
    def experiments(self) -> dict[str, ExperimentRt]:
        return self.state.experiments

    @property
    def attempts(self) -> dict[int, AttemptRt]:
        return self.state.attempts

    @property
    def ready(self) -> set[StageRt]:
        return self.state.ready

    @property
    def heartbeat_interval(self) -> float:
        return self.registry.heartbeat_interval

    @property
    def lost_timeout(self) -> float:
        return self.registry.lost_timeout

    @lost_timeout.setter
    def lost_timeout(self, seconds: float) -> None:
        self.registry.lost_timeout = seconds

    def online(self, node: NodeRt) -> bool:
        return self.registry.online(node)

    def node_state(self, node: NodeRt) -> str:
        return self.registry.node_state(node)

    async def submit(self, plan_json: str, owner: str | None = None) -> str:
        return await self.submissions.submit(plan_json, owner)

    async def cancel(self, key: str, reason: str) -> tuple[int, int, str]:
        return await self.submissions.cancel(key, reason)

    async def rerun(self, key: str, stage: str = "", who: str = "") -> list[str]:
        return await self.submissions.rerun(key, stage, who)

    async def drain(self, ref: str, undrain: bool = False, deadline_s: float = 0.0) -> NodeRt:
        return await self.registry.drain(ref, undrain, deadline_s)

    async def wait_for_events(self, timeout: float) -> None:
        await self.intake.wait_for_events(timeout)
