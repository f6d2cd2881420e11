"""Prometheus metrics of the master, served at ``/metrics`` by the web server (``master/web.py``).

Two kinds, so that heartbeats and scheduling pay next to nothing:

- what the cluster *is* (nodes by state, GPUs, stages by state) is read from :class:`ClusterState`
  only when Prometheus scrapes (:class:`ClusterCollector`, run on the master's loop);
- what *happened* (queue wait, dispatch latency, heartbeat handling, events stored, commits) is counted
  where it happens, into histograms and counters. Stage transitions are read from the units the writer
  thread has just committed (:meth:`Metrics.committed`), so the scheduler and the state machine carry no
  metrics code and a transition counts once it is recorded.

Each controller has its own registry: several masters in one process (tests) never mix their figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from infra.master.state import ASSIGNED, READY, RUNNING, ClusterState, NodeRt

NODE_STATES = ("online", "offline", "lost")
STAGE_STATES = ("pending", "ready", "assigned", "running", "succeeded", "failed", "cancelled")
# queue wait runs from seconds to days; dispatch (assigned -> the node says running) from milliseconds
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MIB = 1 << 20


class ClusterCollector(Collector):
    """Gauges computed at scrape time from the in-memory state (the loop's thread: no locks needed)."""

    def __init__(self, state: ClusterState, node_state: Callable[[NodeRt], str]) -> None:
        self.state = state
        self.node_state = node_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily("infra_nodes", "Registered nodes by state", labels=["state"])
        drained = GaugeMetricFamily("infra_nodes_drained", "Nodes drained by an operator (take no new stages)")
        total = GaugeMetricFamily("infra_gpus", "GPUs a node advertises", labels=["node"])
        used = GaugeMetricFamily("infra_gpus_allocated", "GPUs of a node allocated to attempts", labels=["node"])
        util = GaugeMetricFamily(
            "infra_gpu_utilization_percent", "GPU utilisation from the last heartbeat", labels=["node", "gpu"]
        )
        mem = GaugeMetricFamily(
            "infra_gpu_memory_used_bytes", "GPU memory in use from the last heartbeat", labels=["node", "gpu"]
        )
        mem_total = GaugeMetricFamily("infra_gpu_memory_total_bytes", "GPU memory size", labels=["node", "gpu"])
        counts = dict.fromkeys(NODE_STATES, 0)
        n_drained = 0
        for n in self.state.nodes.values():
            counts[self.node_state(n)] = counts.get(self.node_state(n), 0) + 1
            n_drained += n.drained
            total.add_metric([n.name], len(n.gpus))
            used.add_metric([n.name], len(n.used_gpus))
            for g in getattr(n.usage, "gpus", ()):
                gpu = str(g.index)
                util.add_metric([n.name, gpu], g.utilization_percent)
                mem.add_metric([n.name, gpu], g.memory_used_mib * MIB)
                mem_total.add_metric([n.name, gpu], g.memory_total_mib * MIB)
        for state, count in counts.items():
            nodes.add_metric([state], count)
        drained.add_metric([], n_drained)
        stages = GaugeMetricFamily(
            "infra_stages",
            "Stages of the unfinished experiments (those in the master's memory) by state",
            labels=["state"],
        )
        exps = GaugeMetricFamily("infra_experiments", "Unfinished experiments by state", labels=["state"])
        by_stage = dict.fromkeys(STAGE_STATES, 0)
        by_exp: dict[str, int] = {}
        for e in self.state.experiments.values():
            by_exp[e.state] = by_exp.get(e.state, 0) + 1
            for st in e.stages:
                by_stage[st.state] = by_stage.get(st.state, 0) + 1
        for state, count in by_stage.items():
            stages.add_metric([state], count)
        for state, count in sorted(by_exp.items()):
            exps.add_metric([state], count)
        yield from (nodes, drained, total, used, util, mem, mem_total, stages, exps)


class Metrics:
    """The master's registry and the instruments its parts feed."""

    def __init__(self, state: ClusterState, node_state: Callable[[NodeRt], str]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.queue_wait = Histogram(
            "infra_stage_queue_wait_seconds", "From ready to assigned, per attempt", buckets=WAIT_BUCKETS, registry=r
        )
        self.dispatch = Histogram(
            "infra_stage_dispatch_seconds",
            "From assigned to the node reporting it running, per attempt",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.heartbeat = Histogram(
            "infra_heartbeat_seconds", "Time the master spends handling one heartbeat", buckets=FAST_BUCKETS, registry=r
        )
        self.events_stored = Counter("infra_events_stored", "Events (logs, metrics, artifacts) stored", registry=r)
        self.commit = Histogram(
            "infra_db_commit_seconds", "One group commit of the database writer", buckets=FAST_BUCKETS, registry=r
        )
        r.register(ClusterCollector(state, node_state))
        # when a stage entered the state it is in (writer thread only): ready and assigned stages only
        self._ready_at: dict[int, float] = {}
        self._assigned_at: dict[int, float] = {}

    def committed(self, units: Iterable[Any], seconds: float) -> None:
        """The writer committed ``units`` in ``seconds``: time it, and time the transitions they record."""
        self.commit.observe(seconds)
        for unit in units:
            for t in getattr(unit, "transitions", ()):
                self._transition(t["stage_id"], t["from_state"], t["to_state"], t["time"])

    def _transition(self, stage_id: int, old: str, new: str, at: float) -> None:
        ready_at = self._ready_at.pop(stage_id, None) if old == READY else None
        assigned_at = self._assigned_at.pop(stage_id, None) if old == ASSIGNED else None
        if new == READY:
            self._ready_at[stage_id] = at
        elif new == ASSIGNED:
            self._assigned_at[stage_id] = at
            if ready_at is not None:
                self.queue_wait.observe(max(0.0, at - ready_at))
        elif new == RUNNING and assigned_at is not None:
            self.dispatch.observe(max(0.0, at - assigned_at))
