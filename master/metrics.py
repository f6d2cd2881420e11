"""Prometheus metrics of the master, served at ``/metrics`` by the web server (``master/web.py``).

Two kinds, so that heartbeats and scheduling pay next to nothing:

- what the cluster *is* (nodes by state, GPUs, stages by state) is read from :class:`ClusterState`
  only when Prometheus scrapes: copied as plain tuples on the master's loop (:func:`snapshot`), turned
  into metric families and text in a thread (:meth:`Metrics.render`), so a scrape of a large cluster
  never stalls heartbeats;
- what *happened* (queue wait, dispatch latency, heartbeat handling, events stored, commits) is counted
  where it happens, into histograms and counters. Stage transitions are read from the units the writer
  thread has just committed (:meth:`Metrics.committed`), so the scheduler and the state machine carry no
  metrics code and a transition counts once it is recorded.

Each controller has its own registry: several masters in one process (tests) never mix their figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from infra.master.state import ASSIGNED, READY, RUNNING, ClusterState, NodeRt

NODE_STATES = ("online", "offline", "lost")
STAGE_STATES = ("pending", "ready", "assigned", "running", "succeeded", "failed", "cancelled")
# queue wait runs from seconds to days; dispatch (assigned -> the node says running) from milliseconds
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MIB = 1 << 20


@dataclass
class ClusterSnapshot:
    """What the gauges say, copied from :class:`ClusterState` as plain tuples: cheap enough for the loop."""

    nodes: list[tuple[str, str, bool, int, int]]  # name, state, drained, GPUs, GPUs allocated
    gpus: list[tuple[str, int, float, int, int]]  # node, index, utilisation %, memory used, total (MiB)
    stages: dict[str, int]
    experiments: dict[str, int]


def snapshot(state: ClusterState, node_state: Callable[[NodeRt], str]) -> ClusterSnapshot:
    """Read on the loop (the only thread that changes the state), so no lock is needed."""
    nodes, gpus = [], []
    for n in state.nodes.values():
        nodes.append((n.name, node_state(n), n.drained, len(n.gpus), len(n.used_gpus)))
        for g in getattr(n.usage, "gpus", ()):
            gpus.append((n.name, g.index, g.utilization_percent, g.memory_used_mib, g.memory_total_mib))
    stages = dict.fromkeys(STAGE_STATES, 0)
    experiments: dict[str, int] = {}
    for e in state.experiments.values():
        experiments[e.state] = experiments.get(e.state, 0) + 1
        for st in e.stages:
            stages[st.state] = stages.get(st.state, 0) + 1
    return ClusterSnapshot(nodes, gpus, stages, experiments)


def families(snap: ClusterSnapshot) -> list[GaugeMetricFamily]:
    """The gauges of a snapshot (built off the loop: on a large cluster this is most of a scrape's work)."""
    nodes = GaugeMetricFamily("infra_nodes", "Registered nodes by state", labels=["state"])
    drained = GaugeMetricFamily("infra_nodes_drained", "Nodes drained by an operator (take no new stages)")
    total = GaugeMetricFamily("infra_gpus", "GPUs a node advertises", labels=["node"])
    used = GaugeMetricFamily("infra_gpus_allocated", "GPUs of a node allocated to attempts", labels=["node"])
    gpu = ["node", "gpu"]
    util = GaugeMetricFamily("infra_gpu_utilization_percent", "GPU utilisation from the last heartbeat", labels=gpu)
    mem = GaugeMetricFamily("infra_gpu_memory_used_bytes", "GPU memory in use from the last heartbeat", labels=gpu)
    mem_total = GaugeMetricFamily("infra_gpu_memory_total_bytes", "GPU memory size", labels=gpu)
    counts = dict.fromkeys(NODE_STATES, 0)
    for name, state, _, n_gpus, n_used in snap.nodes:
        counts[state] = counts.get(state, 0) + 1
        total.add_metric([name], n_gpus)
        used.add_metric([name], n_used)
    for state, count in counts.items():
        nodes.add_metric([state], count)
    drained.add_metric([], sum(row[2] for row in snap.nodes))
    for node, index, percent, mem_used, mem_size in snap.gpus:
        labels = [node, str(index)]
        util.add_metric(labels, percent)
        mem.add_metric(labels, mem_used * MIB)
        mem_total.add_metric(labels, mem_size * MIB)
    stages = GaugeMetricFamily(
        "infra_stages", "Stages of the unfinished experiments (those the master holds) by state", labels=["state"]
    )
    for state, count in snap.stages.items():
        stages.add_metric([state], count)
    exps = GaugeMetricFamily("infra_experiments", "Unfinished experiments by state", labels=["state"])
    for state, count in sorted(snap.experiments.items()):
        exps.add_metric([state], count)
    return [nodes, drained, total, used, util, mem, mem_total, stages, exps]


class _Exposition:
    """The registry's instruments and a snapshot's gauges, as one thing to render."""

    def __init__(self, registry: CollectorRegistry, gauges: list[GaugeMetricFamily]) -> None:
        self.registry = registry
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        yield from self.registry.collect()
        yield from self.gauges


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
        self.state = state
        self.node_state = node_state
        # when a stage entered the state it is in (writer thread only): ready and assigned stages only
        self._ready_at: dict[int, float] = {}
        self._assigned_at: dict[int, float] = {}

    def snapshot(self) -> ClusterSnapshot:
        """On the loop: the gauges' data, copied."""
        return snapshot(self.state, self.node_state)

    def render(self, snap: ClusterSnapshot) -> bytes:
        """Prometheus' text format of everything; in any thread (the instruments lock for themselves)."""
        return generate_latest(_Exposition(self.registry, families(snap)))  # type: ignore[arg-type]

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
