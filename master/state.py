"""In-memory model of the live cluster: nodes with their allocations, and unfinished experiments.

The master keeps this authoritative while it runs (the database is written behind it, in order, by
the writer thread) so that heartbeats touch no database and scheduling needs no queries. The parts of
the controller (``master/nodes.py``, ``scheduler.py``, ``lifecycle.py``, ``intake.py``,
``experiments.py``) share one :class:`ClusterState` and nothing else of each other's.

Plain Python only: no protobuf here (``master/wire.py`` translates for the servicers). The runtime
objects are built with keywords: they have many fields of the same types, easy to swap by position.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from infra.spec.stages import Rendezvous, Resources

PENDING, READY, ASSIGNED, RUNNING = "pending", "ready", "assigned", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({ASSIGNED, RUNNING})


@dataclass(eq=False, kw_only=True)
class NodeRt:
    id: str
    name: str
    facts: dict[str, Any]
    cpus: float
    memory_mib: int
    gpus: list[int]  # indices
    kinds: frozenset[str]
    extras: frozenset[str]
    session: int = 0  # 0: not registered with this master process
    queue: asyncio.Queue[Command | None] | None = None  # the open command stream, if any (None ends it)
    last_heartbeat: float | None = None  # last heard from: a heartbeat, or any report
    beat_at: float | None = None  # when its previous heartbeat of this session was processed
    usage: Any = None  # the last usage, opaque here (the servicers' message; ControllerOptions.usage_row)
    heartbeat_dirty: bool = False
    lost_at: float | None = None  # set when heartbeats stopped for the lost timeout; cleared on re-registration
    unavailable: str = ""  # the node's own reason to take no new stages (e.g. low disk)
    drained: bool = False  # by an operator (persisted): no new stages, running ones finish
    drain_deadline: float | None = None  # after it, what still runs here is stopped (preempted)
    facts_message: Any = None  # the servicers' cache of the facts as a message, built once per registration
    used_cpus: float = 0.0
    used_memory_mib: int = 0
    used_gpus: set[int] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)  # rendezvous ports of the gangs whose member 0 runs here
    attempts: dict[int, AttemptRt] = field(default_factory=dict)  # active (assigned/running) here
    pending_cancels: list[tuple[int, str]] = field(default_factory=list)  # unknown attempts it still runs

    @property
    def lost(self) -> bool:
        return self.lost_at is not None

    @property
    def address(self) -> str:
        """Where other nodes reach this one (``--advertise-address``); "" from an agent that cannot host a gang."""
        return str(self.facts.get("advertise_address") or "")

    def schedulable(self) -> bool:
        return self.queue is not None and self.lost_at is None and not self.unavailable and not self.drained

    def free_gpus(self) -> list[int]:
        return [g for g in self.gpus if g not in self.used_gpus]

    def fits(self, r: Resources) -> bool:
        """Enough free resources now (a tiny tolerance keeps float CPU sums exact enough)."""
        return (
            r.gpus <= len(self.gpus) - len(self.used_gpus)
            and r.cpus <= self.cpus - self.used_cpus + 1e-9
            and r.memory_mib <= self.memory_mib - self.used_memory_mib
        )

    def could_fit(self, r: Resources) -> bool:
        return r.gpus <= len(self.gpus) and r.cpus <= self.cpus + 1e-9 and r.memory_mib <= self.memory_mib

    def allocate(self, attempt: AttemptRt) -> None:
        r = attempt.stage.resources
        self.used_cpus += r.cpus
        self.used_memory_mib += r.memory_mib
        self.used_gpus.update(attempt.gpus)
        if attempt.port:
            self.ports.add(attempt.port)
        self.attempts[attempt.id] = attempt

    def release(self, attempt: AttemptRt) -> None:
        if self.attempts.pop(attempt.id, None) is None:
            return
        r = attempt.stage.resources
        self.used_cpus = max(0.0, self.used_cpus - r.cpus)
        self.used_memory_mib = max(0, self.used_memory_mib - r.memory_mib)
        self.used_gpus.difference_update(attempt.gpus)
        self.ports.discard(attempt.port)


@dataclass(eq=False, kw_only=True)
class AttemptRt:
    id: int
    stage: StageRt
    number: int
    node_id: str
    lease: str
    gpus: tuple[int, ...]
    state: str
    started_at: float = 0.0  # when the node reported RUNNING
    failure_class: str = ""  # once ended badly: node_lost | preempted | cancelled | error | infra
    progress: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # latest (done, total) per `what`
    rank: int = 0  # the member of a gang (a multi-node stage) it is; 0 otherwise
    rendezvous: Rendezvous | None = None  # a gang member's: where the members meet
    exit_code: int = 0  # once ended: as reported (a gang's reason names every member's end)
    message: str = ""
    ended_at: float = 0.0
    stop_at: float | None = None  # a gang member the master told to stop (its gang is ending): when
    stop_why: str = ""  # what that Stop said (sent again when the node's stream reopens)

    @property
    def port(self) -> int:
        """The rendezvous port that member 0 of a gang holds on its node (0: none)."""
        if self.rendezvous is None or self.rank != 0:
            return 0
        return int(self.rendezvous.endpoint.rpartition(":")[2])


@dataclass(eq=False, kw_only=True)
class StageRt:
    id: int
    exp: ExperimentRt
    position: int
    name: str
    kind: str
    params: dict[str, Any]
    resources: Resources
    max_retries: int
    state: str
    attempts: int = 0
    extras: frozenset[str] = frozenset()
    reason: str = ""  # as in its row: a new waiting reason is written only when it differs
    deps: list[StageRt] = field(default_factory=list)
    dependents: list[StageRt] = field(default_factory=list)
    current: AttemptRt | None = None  # the latest attempt (of a gang: its member 0)
    members: list[AttemptRt] = field(default_factory=list)  # the latest attempt's members, by rank (a gang: K)
    attempt_ids: list[int] = field(default_factory=list)  # those in the master's memory
    retries: dict[str, int] = field(default_factory=dict)  # budget per failure class (infra.spec.plan.RETRY_CLASSES)
    used: dict[str, int] = field(default_factory=dict)  # retries spent per class since budget_from
    budget_from: int = 1  # attempts numbered from here count against the budgets (a rerun starts afresh)

    def gang(self) -> bool:
        """Whether the latest attempt is a gang's (several members, one per node)."""
        return len(self.members) > 1

    def sort_key(self) -> tuple[int, int, int]:
        """Priority first (higher first), then submission order."""
        return (-self.exp.priority, self.exp.id, self.position)


@dataclass(eq=False, kw_only=True)
class ExperimentRt:
    id: int
    key: str
    name: str
    priority: int
    smoke: bool
    shared_workdir: bool
    state: str
    cancel_requested: bool = False
    home_node: str | None = None  # where its files are, unless the workdir is shared
    owner: str | None = None  # the submitting user (None without authentication)
    stages: list[StageRt] = field(default_factory=list)
    plan_json: str = ""  # the normalised plan, sent with each assignment (the node records it as plan.json)

    def need(self) -> Resources:
        """The largest single-stage request: a home node must be able to run every stage."""
        rs = [s.resources for s in self.stages]
        return Resources(max(r.gpus for r in rs), max(r.cpus for r in rs), max(r.memory_mib for r in rs))

    def kinds(self) -> set[str]:
        return {s.kind for s in self.stages}

    def extras(self) -> set[str]:
        return set().union(*(s.extras for s in self.stages))


@dataclass(frozen=True, kw_only=True)
class Stop:
    """A command to a node: stop its copy of an attempt (cancelled, preempted, or no longer current)."""

    attempt_id: int
    lease: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Fetch:
    """A command to a node: upload a file of an experiment record for a client (``master/artifacts.py``)."""

    transfer_id: int
    experiment: str
    path: str  # relative to the experiment directory
    offset: int
    max_bytes: int
    stat: bool = False


Command = AttemptRt | Stop | Fetch  # what a node's queue carries: an attempt to run, a stop, a file to send


@dataclass(eq=False)
class ClusterState:
    """Everything the parts of the controller share: one object of dicts, changed only on the loop."""

    nodes: dict[str, NodeRt] = field(default_factory=dict)
    experiments: dict[str, ExperimentRt] = field(default_factory=dict)  # unfinished, by key
    attempts: dict[int, AttemptRt] = field(default_factory=dict)  # every attempt of an unfinished experiment
    ready: set[StageRt] = field(default_factory=set)
    stopping: dict[int, AttemptRt] = field(default_factory=dict)  # gang members told to stop, not yet ended
    ids: dict[str, int] = field(default_factory=dict)  # the last id given, per table (the master allocates them)
    # bumped whenever a node is added or replaced (its facts may differ): what is derived from every node's
    # facts is kept until it changes, instead of being gathered from 10,000 nodes per call
    facts_version: int = 0

    def next_id(self, kind: str) -> int:
        self.ids[kind] += 1
        return self.ids[kind]

    def current(self, node_id: str, attempt_id: int, lease: str) -> AttemptRt | None:
        """The attempt, if ``node_id`` holds it under ``lease`` and it is its stage's current one (fencing); a
        gang's member is current while it has not ended at the master (a member told to stop because its gang
        is ending still reports how it ended: that end decides the gang's failure class)."""
        att = self.attempts.get(attempt_id)
        if att is None or att.lease != lease or att.node_id != node_id:
            return None
        st = att.stage
        if st.gang():
            return att if att in st.members and att.state not in TERMINAL else None
        return att if st.current is att else None
