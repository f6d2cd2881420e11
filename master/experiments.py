"""What users ask of experiments: submit a plan (ids, rows, dependencies), cancel, rerun.

A submitted experiment enters memory only once its rows are committed; cancel and rerun change memory
and commit as one unit (:meth:`~master.journal.Journal.apply`). Stops for running attempts are sent
only after the cancel is committed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from infra.master import store
from infra.master.errors import NotFound, Refused
from infra.master.journal import Journal, Part
from infra.master.lifecycle import StageMachine, stage_extras
from infra.master.state import (
    ACTIVE,
    CANCELLED,
    FAILED,
    PENDING,
    READY,
    SUCCEEDED,
    TERMINAL,
    ClusterState,
    ExperimentRt,
    NodeRt,
    StageRt,
    Stop,
)
from infra.master.store import Changes
from infra.spec.plan import Plan, parse_plan_text, validate_plan
from infra.spec.stages import stage_kinds

log = logging.getLogger("infra.master")


class Experiments(Part):
    def __init__(
        self, state: ClusterState, machine: StageMachine, journal: Journal, *, engine: Engine, wake: Callable[[], None]
    ) -> None:
        super().__init__(state, machine, journal)
        self.engine = engine  # for reads of experiments no longer in memory
        self.wake = wake
        self._kinds: tuple[int, set[str]] | None = None  # (facts version, the kinds some node offers)

    def known_kinds(self) -> set[str]:
        """Built-in kinds and those of every node; the nodes' part is kept while no node registers."""
        if self._kinds is None or self._kinds[0] != self.state.facts_version:
            kinds: set[str] = set().union(*(n.kinds for n in self.state.nodes.values()))
            self._kinds = (self.state.facts_version, kinds)
        return set(stage_kinds()) | self._kinds[1]

    async def submit(self, plan_json: str, owner: str | None = None) -> str:
        """Validation runs in a thread: a large plan (up to the size limit) must not stall the loop."""
        kinds = self.known_kinds()
        plan = await self.journal.read(lambda: validate_plan(parse_plan_text(plan_json), known_kinds=kinds))
        now = time.time()
        ids = self.state.ids
        ids_before = dict(ids)
        exp = self._build(plan, owner)
        rows, transitions = self._rows(exp, plan, now)
        deps = [{"stage_id": st.id, "depends_on_id": d.id} for st in exp.stages for d in st.deps]
        ids_after = dict(ids)
        try:
            await self.journal.commit(store.NewExperiment(rows[0], rows[1], deps, transitions))
        except Exception:
            # nothing of it is in memory yet; its ids are given back unless another submit took ids since
            if ids == ids_after:
                ids.update(ids_before)
            raise
        self.state.experiments[exp.key] = exp
        self.state.ready.update(st for st in exp.stages if st.state == READY)
        self.wake()
        log.info("experiment %s submitted: %d stages", exp.key, len(exp.stages))
        return exp.key

    def _build(self, plan: Plan, owner: str | None) -> ExperimentRt:
        """The experiment of a validated plan, with new ids, its stages pending (not in memory yet)."""
        exp_id = self.state.next_id("experiment")
        exp = ExperimentRt(
            id=exp_id,
            key=f"{plan.name}-{exp_id}",
            name=plan.name,
            priority=plan.priority,
            smoke=plan.smoke,
            shared_workdir=plan.shared_workdir,
            state=PENDING,
            owner=owner,
            plan_json=json.dumps(plan.to_dict()),
        )
        by_name: dict[str, StageRt] = {}
        for pos, s in enumerate(plan.stages):
            st = StageRt(
                id=self.state.next_id("stage"),
                exp=exp,
                position=pos,
                state=PENDING,
                name=s.name,
                kind=s.kind,
                extras=stage_extras(s.kind, s.params),
                params=s.params,
                retries=dict(s.retries),
                max_retries=s.max_retries,
                resources=s.resources,
            )
            exp.stages.append(st)
            by_name[s.name] = st
        for s in plan.stages:
            for dep in s.after:
                by_name[s.name].deps.append(by_name[dep])
                by_name[dep].dependents.append(by_name[s.name])
        return exp

    @staticmethod
    def _rows(exp: ExperimentRt, plan: Plan, now: float) -> tuple[Any, list[dict[str, Any]]]:
        transitions = []
        for st in exp.stages:
            st.reason = "submitted"
            transitions.append(_transition(st, "", PENDING, "submitted", now))
            if not st.deps:
                st.state, st.reason = READY, "no dependencies"
                transitions.append(_transition(st, PENDING, READY, "no dependencies", now))
        exp_row = {
            "id": exp.id,
            "key": exp.key,
            "name": exp.name,
            "priority": exp.priority,
            "smoke": exp.smoke,
            "shared_workdir": exp.shared_workdir,
            "plan": plan.to_dict(),
            "state": PENDING,
            "cancel_requested": False,
            "home_node_id": None,
            "owner": exp.owner,
            "created_at": now,
            "finished_at": None,
        }
        stage_rows = [
            {
                "id": st.id,
                "experiment_id": exp.id,
                "position": st.position,
                "name": st.name,
                "kind": st.kind,
                "params": st.params,
                "gpus": st.resources.gpus,
                "cpus": st.resources.cpus,
                "memory_mib": st.resources.memory_mib,
                "max_retries": st.max_retries,
                "retries": st.retries,
                "budget_from": 1,
                "state": st.state,
                "reason": st.reason,
                "attempts": 0,
                "updated_at": now,
            }
            for st in exp.stages
        ]
        return (exp_row, stage_rows), transitions

    async def cancel(self, key: str, reason: str) -> tuple[int, int, str]:
        """(stages cancelled at once, running attempts told to stop, "" or the state of an experiment that
        had already finished, to which nothing is done)."""
        exp = self.state.experiments.get(key)
        if exp is None:
            state = await self.journal.read(store.experiment_state, self.engine, key)
            if state is None:
                raise NotFound(f"no experiment {key!r}")
            return 0, 0, state
        why = f"cancelled: {reason}" if reason else "cancelled"
        stops: list[tuple[NodeRt, Stop]] = []

        def build(ch: Changes, now: float) -> tuple[int, int]:
            exp.cancel_requested = True
            ch.experiments.append({"id": exp.id, "cancel_requested": True})
            cancelled = signalled = 0
            for st in exp.stages:
                if st.state in (PENDING, READY):
                    self.machine.move(st, CANCELLED, why, ch, now)
                    cancelled += 1
                elif st.state in ACTIVE and st.current is not None:
                    for att in st.members or [st.current]:  # every member of a gang
                        node = self.state.nodes.get(att.node_id)
                        if att.state in ACTIVE and node is not None and node.queue is not None:
                            stops.append((node, Stop(attempt_id=att.id, lease=att.lease, reason=why)))
                    signalled += 1  # a node that is away gets the cancel when its stream reopens
            self.machine.update_experiment(exp, ch, now)
            return cancelled, signalled

        cancelled, signalled = await self.journal.apply(exp, build)
        for node, command in stops:
            if node.queue is not None:
                node.queue.put_nowait(command)
        return cancelled, signalled, ""

    async def rerun(self, key: str, stage: str = "", who: str = "") -> list[str]:
        """New attempts for an experiment's stages (the old attempts are kept): with ``stage``, that stage
        and every stage after it; without, every stage that did not succeed and every stage after those.
        A finished experiment is read back into memory. Budgets start afresh for the stages that run
        again (attempts from the next number on count)."""
        exp = self.state.experiments.get(key)
        if exp is None:
            snap = await self.journal.commit(lambda s: store.load_experiment(s, key))
            if not snap.experiments:
                raise NotFound(f"no experiment {key!r}")
            exp = self.state.experiments.get(key)  # a handler may have loaded it meanwhile
            if exp is None:
                self.machine.restore(snap, Changes(), time.time())
                exp = self.state.experiments[key]
        try:
            targets = _rerun_targets(exp, stage)
        except (NotFound, Refused):
            if all(st.state in TERMINAL for st in exp.stages):
                self.machine.forget(exp)  # memory holds unfinished experiments only
            raise
        why = f"rerun requested by {who}" if who else "rerun requested"

        def build(ch: Changes, now: float) -> list[str]:
            if exp.cancel_requested:
                exp.cancel_requested = False
                ch.experiments.append({"id": exp.id, "cancel_requested": False})
            ordered = sorted(targets, key=lambda st: st.position)
            for st in ordered:
                st.budget_from, st.used = st.attempts + 1, {}
                ch.stages.append({"id": st.id, "budget_from": st.budget_from})
            for st in ordered:
                ready = all(d.state == SUCCEEDED and d not in targets for d in st.deps)
                self.machine.move(st, READY if ready else PENDING, why, ch, now)
            self.state.experiments[exp.key] = exp
            self.machine.update_experiment(exp, ch, now)
            return [st.name for st in ordered]

        names = await self.journal.apply(exp, build)
        log.info("experiment %s: rerun of %s", key, ", ".join(names))
        self.wake()
        return names


def _transition(st: StageRt, from_state: str, to_state: str, reason: str, now: float) -> dict[str, Any]:
    return {
        "stage_id": st.id,
        "attempt_id": None,
        "from_state": from_state,
        "to_state": to_state,
        "time": now,
        "reason": reason,
    }


def _rerun_targets(exp: ExperimentRt, stage: str) -> set[StageRt]:
    """The stages a rerun runs again: ``stage`` or every failed and cancelled stage, and everything
    after them (iterative, like the cascade); refused while one of them still runs."""
    if stage:
        start = next((st for st in exp.stages if st.name == stage), None)
        if start is None:
            raise NotFound(f"no stage {exp.key}/{stage}")
        roots = [start]
    else:
        roots = [st for st in exp.stages if st.state in (FAILED, CANCELLED)]
    targets: set[StageRt] = set()
    todo = list(roots)
    while todo:
        st = todo.pop()
        if st not in targets:
            targets.add(st)
            todo.extend(st.dependents)
    busy = sorted(st.name for st in targets if st.state in ACTIVE)
    if busy:
        raise Refused(f"stage(s) {', '.join(busy)} of {exp.key} still run: cancel them or wait")
    if not targets:
        raise Refused(f"nothing to rerun: every stage of {exp.key} succeeded or still runs")
    return targets
