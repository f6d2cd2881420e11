"""The scheduler: places ready stages on nodes, and says why a stage that no node takes waits.

Ready stages go by priority, then submission order; each is placed best fit on GPUs, from a rotating
start so that equal nodes share the work; an experiment stays on its home node (the one holding its
files) unless its plan declares ``shared_workdir``. A gang (a stage with ``resources.nodes`` K > 1, which
always has a shared workdir) is placed all or nothing: K distinct nodes that fit it, each best fit, and a
free rendezvous port on the first, reserved together in one pass, or nothing at all, so a waiting gang never
holds resources and two gangs cannot each hold half of what both need. A pass is memory only: its attempts
are committed as one unit, queued before anything later can touch those stages, and sent to the nodes once
committed. A ready stage that no node takes says why in its reason (:class:`WaitingReasons`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from infra.master.config import ControllerOptions
from infra.master.journal import Journal, Part
from infra.master.lifecycle import StageMachine
from infra.master.state import ASSIGNED, AttemptRt, ClusterState, ExperimentRt, NodeRt, StageRt
from infra.master.store import Changes
from infra.spec.stages import Rendezvous, Resources

log = logging.getLogger("infra.master")
MAX_PLACEMENTS = 500  # per scheduling pass


class Scheduler(Part):
    def __init__(
        self,
        state: ClusterState,
        machine: StageMachine,
        journal: Journal,
        *,
        wake: Callable[[], None],
        ports: tuple[int, int] = ControllerOptions.rendezvous_ports,
    ) -> None:
        super().__init__(state, machine, journal)
        self.wake = wake
        self.ports = ports  # a gang's rendezvous port on its first node: from this range, inclusive
        self._next_port = ports[0]  # given in turn, so a port freed a moment ago is the last to be given again
        self._rotation = 0
        self._waiting: WaitingReasons | None = None  # kept while no node comes, goes or changes

    def forget(self, exp: ExperimentRt) -> None:
        """An experiment left memory: what the waiting reasons keep about it goes too."""
        if self._waiting is not None:
            self._waiting.forget(exp)

    def schedule(self) -> None:
        """One pass over the ready stages (at most ``MAX_PLACEMENTS`` placements, so that a huge backlog
        never holds the event loop for long; a full pass wakes the next one)."""
        if not self.state.ready:
            return
        nodes = [n for n in self.state.nodes.values() if n.schedulable() and n.used_cpus < n.cpus]
        if not nodes and any(n.schedulable() for n in self.state.nodes.values()):
            return  # every node is full: the next stage to end wakes a pass, which also says who waits why
        now = time.time()
        ch = Changes()
        sent: list[tuple[NodeRt, AttemptRt]] = []
        try:
            self._place_ready(nodes, ch, sent, now)
        except Exception:  # nothing of this pass was queued: memory goes back to what the database says
            asyncio.ensure_future(self.journal.resync(ch))
            raise
        if ch:  # queued now, so that a later change of the same stages (a cancel) is written after it
            asyncio.ensure_future(self._deliver(asyncio.wrap_future(self.journal.queue(ch)), sent, ch))

    def _place_ready(self, nodes: list[NodeRt], ch: Changes, sent: list[tuple[NodeRt, AttemptRt]], now: float) -> None:
        unplaceable: dict[tuple[Any, ...], str] = {}  # shape -> why ("": it depends on the experiment)
        waiting: WaitingReasons | None = None  # taken on the first stage that finds no node
        for st in sorted(self.state.ready, key=StageRt.sort_key):
            if len(sent) >= MAX_PLACEMENTS:
                self.wake()
                break
            shape = self._shape(st)
            why = unplaceable.get(shape)
            members = None if why is not None else self._place_gang(st, nodes)
            if not members:
                waiting = waiting or self._waiting_reasons()
                if why is None:
                    why = unplaceable[shape] = waiting.explain(st, shape)
                self._set_reason(st, why or waiting.impossible(st.exp), ch, now)
                continue
            sent += self._assign(st, members, ch, now)

    def _place_gang(self, st: StageRt, nodes: list[NodeRt]) -> list[tuple[NodeRt, Rendezvous | None]]:
        """Where the stage's members go, all of them or none: one node for a plain stage; K distinct nodes for
        a gang, the first holding a free rendezvous port. Nothing is reserved here: what is found is assigned
        at once by the caller, in the same pass (memory only, on the loop)."""
        k = st.resources.nodes
        if k <= 1:
            node = self._place(st, nodes)
            return [(node, None)] if node is not None else []
        chosen: list[NodeRt] = []
        for _ in range(k):
            node = self._place(st, [n for n in nodes if n not in chosen and n.address])
            if node is None:
                return []
            chosen.append(node)
        first = next((n for n in chosen if self._free_port(n)), None)
        if first is None:
            return []
        chosen.remove(first)
        chosen.insert(0, first)
        port = self._free_port(first)
        self._next_port = port + 1 if port < self.ports[1] else self.ports[0]
        run_id = f"{st.exp.key}.{st.name}.{st.attempts + 1}"
        endpoint = f"[{first.address}]:{port}" if ":" in first.address else f"{first.address}:{port}"
        return [(n, Rendezvous(endpoint, k, r, run_id)) for r, n in enumerate(chosen)]

    def _free_port(self, node: NodeRt) -> int:
        """The next port of the range that no gang holds on ``node`` (0: all are held)."""
        lo, hi = self.ports
        size = hi - lo + 1
        for i in range(size):
            port = lo + (self._next_port - lo + i) % size
            if port not in node.ports:
                return port
        return 0

    def _assign(
        self, st: StageRt, members: list[tuple[NodeRt, Rendezvous | None]], ch: Changes, now: float
    ) -> list[tuple[NodeRt, AttemptRt]]:
        """A new attempt of ``st``: one row per member (a gang's K share the number, each with its rank, node,
        lease and rendezvous); the first one of an experiment without a shared workdir makes its node the home."""
        st.attempts += 1
        st.members = []
        for rank, (node, rdzv) in enumerate(members):
            att = AttemptRt(
                id=self.state.next_id("attempt"),
                stage=st,
                number=st.attempts,
                node_id=node.id,
                lease=secrets.token_hex(16),
                gpus=tuple(node.free_gpus()[: st.resources.gpus]),
                state=ASSIGNED,
                rank=rank,
                rendezvous=rdzv,
            )
            node.allocate(att)
            st.members.append(att)
            st.attempt_ids.append(att.id)
            self.state.attempts[att.id] = att
            ch.new_attempts.append(
                {
                    "id": att.id,
                    "stage_id": st.id,
                    "number": att.number,
                    "rank": rank,
                    "rendezvous": asdict(rdzv) if rdzv is not None else None,
                    "node_id": node.id,
                    "lease_token": att.lease,
                    "gpu_indices": list(att.gpus),
                    "state": ASSIGNED,
                    "exit_code": None,
                    "message": "",
                    "failure_class": "",
                    "assigned_at": now,
                    "started_at": None,
                    "finished_at": None,
                }
            )
        att, node = st.members[0], members[0][0]
        st.current = att
        where = ", ".join(n.name for n, _ in members)
        self.machine.move(st, ASSIGNED, f"attempt {att.number} assigned to {where}", ch, now, att)
        if not st.exp.shared_workdir and st.exp.home_node is None:
            st.exp.home_node = node.id
            ch.experiments.append({"id": st.exp.id, "home_node_id": node.id})
        self.machine.update_experiment(st.exp, ch, now)
        return [(n, m) for (n, _), m in zip(members, st.members, strict=True)]

    async def _deliver(self, committed: Awaitable[None], sent: list[tuple[NodeRt, AttemptRt]], ch: Changes) -> None:
        """Send assignments once they are committed; one that cannot be sent now is re-sent when the
        node's stream reopens (it stays 'assigned'). A pass that could not be recorded is undone in memory
        by reading its experiments back: those stages are ready again and the nodes' resources free."""
        try:
            await committed
        except Exception:
            log.exception("could not record a scheduling pass (%d assignments)", len(sent))
            await self.journal.resync(ch)
            return
        for node, att in sent:
            if node.queue is not None and att.state == ASSIGNED:
                node.queue.put_nowait(att)

    def _place(self, st: StageRt, nodes: list[NodeRt]) -> NodeRt | None:
        """Best fit on GPUs (the fewest GPUs left idle), scanning from a rotating start so that equal
        nodes share the work; a node that fits with no GPU left idle ends the scan."""
        exp, r = st.exp, st.resources
        if not exp.shared_workdir and exp.home_node is not None:  # its inputs are on that node
            node = self.state.nodes.get(exp.home_node)
            ok = node is not None and node.schedulable() and node.fits(r)
            return node if ok and _offers(node, {st.kind}, st.extras) else None
        if exp.shared_workdir:
            kinds, extras, need = {st.kind}, set(st.extras), r
        else:  # choosing the home node: it must be able to run every stage of the experiment
            kinds, extras, need = exp.kinds(), exp.extras(), exp.need()
        best, best_spare = None, None
        n = len(nodes)
        for k in range(n):
            node = nodes[(self._rotation + k) % n]
            if node.fits(r) and node.could_fit(need) and _offers(node, kinds, extras):
                spare = len(node.gpus) - len(node.used_gpus) - r.gpus
                if best_spare is None or spare < best_spare:
                    best, best_spare = node, spare
                    if spare == 0:
                        break
        self._rotation += 1
        return best

    @staticmethod
    def _shape(st: StageRt) -> tuple[Any, ...]:
        """What decides whether a stage fits somewhere: within one pass (free resources only shrink), once a
        shape found no node, every later stage of that shape is skipped without scanning the nodes again."""
        exp = st.exp
        if exp.shared_workdir:
            return (st.resources, st.kind, st.extras)
        if exp.home_node is None:
            return (st.resources, frozenset(exp.kinds()), frozenset(exp.extras()), exp.need())
        return (st.resources, st.kind, st.extras, exp.home_node)

    @staticmethod
    def _set_reason(st: StageRt, reason: str, ch: Changes, now: float) -> None:
        """A stage that stays ``ready`` for a new reason: its row says so, no transition; an unchanged
        reason writes nothing, so passes over a waiting backlog cost the database nothing."""
        if reason != st.reason:
            st.reason = reason
            ch.stages.append({"id": st.id, "reason": reason, "updated_at": now})

    def _waiting_reasons(self) -> WaitingReasons:
        """The last pass's explainer, as long as the same nodes are online with the same facts (a node that
        registers again is a new object) and the same ones take no new stages: what it keeps depends on
        nothing else."""
        online = [n for n in self.state.nodes.values() if n.queue is not None and not n.lost]
        fleet = [(n, bool(n.unavailable or n.drained)) for n in online]
        if self._waiting is None or self._waiting.fleet != fleet:
            self._waiting = WaitingReasons(self.state.nodes, fleet)
        return self._waiting


def _offers(node: NodeRt, kinds: set[str], extras: set[str] | frozenset[str]) -> bool:
    """The node offers every kind and extra (whether it has the resources is asked apart)."""
    return kinds <= node.kinds and extras <= node.extras


class WaitingReasons:
    """Why ready stages found no node, for their ``reason`` (``infra status``); asked only for a stage that
    was not placed, once per shape and pass. What depends only on the online nodes (all but a home node's
    free resources) is kept across passes while they stay the same: the verdict for a shape, what each
    kind, extras and resources lack, and the reason of each experiment that no node could ever take."""

    def __init__(self, nodes: dict[str, NodeRt], fleet: list[tuple[NodeRt, bool]]) -> None:
        self.nodes = nodes
        self.fleet = fleet  # (online node, takes no new stages)
        self.online = [n for n, _ in fleet]
        self._shapes: dict[tuple[Any, ...], str] = {}
        self._problems: dict[tuple[str, frozenset[str], Resources], str | None] = {}
        self._experiments: dict[int, str] = {}

    def explain(self, st: StageRt, shape: tuple[Any, ...]) -> str:
        """Why no node takes a stage of this shape now; "" when no node could ever take its experiment, whose
        stages then say why (:meth:`impossible`)."""
        if not st.exp.shared_workdir and st.exp.home_node is not None:
            return self._home(st, st.exp.home_node)  # the node's free resources change every pass
        if st.resources.nodes > 1:
            return self._gang(st)  # so do the free nodes a gang counts
        if shape not in self._shapes:
            self._shapes[shape] = self._explain(st)
        return self._shapes[shape]

    def forget(self, exp: ExperimentRt) -> None:
        self._experiments.pop(exp.id, None)

    def _explain(self, st: StageRt) -> str:
        exp, r = st.exp, st.resources
        if not self.online:
            return "waiting: no online node"
        if exp.shared_workdir:
            problem = self._problem(st)
            if problem:
                return f"waiting: no online node can run this stage ({problem})"
            able = [n for n in self.online if _can_ever_run(n, {st.kind}, st.extras, r)]
        else:
            able = [n for n in self.online if _can_ever_run(n, exp.kinds(), exp.extras(), exp.need())]
            if not able:
                return ""
        if all(n.unavailable or n.drained for n in able):
            names = ", ".join(sorted(n.name for n in able)[:3]) + (", ..." if len(able) > 3 else "")
            return f"waiting: the nodes that can run it take no new stages now ({names}; see infra status)"
        return f"waiting for resources: needs {_amounts(r)}"

    def _gang(self, st: StageRt) -> str:
        """A gang waits for K nodes free at once (it holds nothing meanwhile): how many it has now."""
        r, k = st.resources, st.resources.nodes
        if not self.online:
            return "waiting: no online node"
        problem = self._problem(st)
        if problem:
            return f"waiting: no online node can run this stage ({problem})"
        able = [n for n in self.online if _can_ever_run(n, {st.kind}, st.extras, r)]
        hosts = [n for n in able if n.address]
        if len(hosts) < k:
            mute = len(able) - len(hosts)
            note = f"; {mute} advertise{'s' if mute == 1 else ''} no address (infra node --advertise-address)"
            return f"waiting: needs {k} nodes that can run it together, {len(hosts)} online{note if mute else ''}"
        free = [n for n in hosts if n.schedulable() and n.fits(r)]
        if len(free) >= k:
            return "waiting for a rendezvous port: every port of --rendezvous-ports is held on the free nodes"
        has = "has" if len(free) == 1 else "have"
        return f"waiting for {k} nodes with {_amounts(r) or 'room'} free each: {len(free)} {has}"

    def _home(self, st: StageRt, home: str) -> str:
        """A stage of an experiment without a shared workdir can only run where its inputs are."""
        node = self.nodes.get(home)
        where = f"waiting for node {node.name if node else home}"
        if node is None or node.lost:
            return f"{where}: it is lost (after --home-wait the experiment starts over on another node)"
        if node.queue is None:
            return f"{where}: it is offline"
        problem = _cannot_run([node], st.kind, st.extras, st.resources)
        if problem:
            return f"{where}: it cannot run this stage ({problem})"
        if node.drained:
            return f"{where}: it is drained by an operator (infra node undrain {node.name})"
        if node.unavailable:
            return f"{where}: it takes no new stages now (see infra status)"
        free = Resources(
            len(node.gpus) - len(node.used_gpus), node.cpus - node.used_cpus, node.memory_mib - node.used_memory_mib
        )
        return f"{where}: busy ({_shortfall(st.resources, free, lambda v: f'{v} free')})"

    def _problem(self, st: StageRt) -> str | None:
        key = (st.kind, st.extras, st.resources)
        if key not in self._problems:
            self._problems[key] = _cannot_run(self.online, st.kind, st.extras, st.resources)
        return self._problems[key]

    def impossible(self, exp: ExperimentRt) -> str:
        """No online node can run every stage of the experiment: what each stage lacks, by stage name."""
        if exp.id not in self._experiments:
            stages: dict[str, list[str]] = {}
            for s in exp.stages:
                if problem := self._problem(s):
                    stages.setdefault(problem, []).append(s.name)
            detail = "; ".join(
                f"stage{'s' if len(names) > 1 else ''} {', '.join(names)}: {problem}"
                for problem, names in stages.items()
            )
            self._experiments[exp.id] = (
                "waiting: no online node can run every stage of this experiment "
                f"({detail or 'each stage fits some node, but no node fits all of them'})"
            )
        return self._experiments[exp.id]


def _can_ever_run(node: NodeRt, kinds: set[str], extras: set[str] | frozenset[str], need: Resources) -> bool:
    return _offers(node, kinds, extras) and node.could_fit(need)


def _cannot_run(nodes: list[NodeRt], kind: str, extras: frozenset[str], r: Resources) -> str | None:
    """What keeps every one of ``nodes`` from ever running a stage (None: one of them could, once free)."""
    able = [n for n in nodes if kind in n.kinds]
    if not able:
        return f"kind {kind!r} not offered"
    missing = extras - frozenset().union(*(n.extras for n in able))
    if missing:
        return f"missing extra{'s' if len(missing) > 1 else ''} " + ", ".join(repr(e) for e in sorted(missing))
    fit = [n for n in able if extras <= n.extras]
    if not fit:
        return "no node has extras " + ", ".join(repr(e) for e in sorted(extras)) + " together"
    if any(n.could_fit(r) for n in fit):
        return None
    most = Resources(max(len(n.gpus) for n in fit), max(n.cpus for n in fit), max(n.memory_mib for n in fit))
    if len(nodes) == 1:
        largest = f"node {nodes[0].name}"
    else:
        largest = "the largest node" if len(fit) == len(nodes) else "the largest node able to run it"
    return _shortfall(r, most, lambda v: f"{largest} has {v}") or f"needs {_amounts(r)} on one node, none has all"


def _shortfall(r: Resources, have: Resources, against: Callable[[str], str]) -> str:
    """Each resource that ``r`` asks beyond ``have``, e.g. ``needs 4 cpus, the largest node has 2`` where
    ``against("2")`` says the second half; empty when ``r`` fits."""
    parts = []
    if r.gpus > have.gpus:
        parts.append(f"needs {_count(r.gpus, 'gpu')}, {against(str(have.gpus))}")
    if r.cpus > have.cpus + 1e-9:
        parts.append(f"needs {_count(r.cpus, 'cpu')}, {against(f'{have.cpus:g}')}")
    if r.memory_mib > have.memory_mib:
        parts.append(f"needs {r.memory_mib} MiB memory, {against(f'{have.memory_mib} MiB')}")
    return "; ".join(parts)


def _amounts(r: Resources) -> str:
    """``1 gpu, 4 cpus, 2048 MiB memory`` (zeros left out)."""
    parts = []
    if r.gpus:
        parts.append(_count(r.gpus, "gpu"))
    if r.cpus:
        parts.append(_count(r.cpus, "cpu"))
    if r.memory_mib:
        parts.append(f"{r.memory_mib} MiB memory")
    return ", ".join(parts)


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}{'' if n == 1 else 's'}"
