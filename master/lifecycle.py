"""The stage state machine: transitions, the end of an attempt, retry budgets, the cascade, experiment state.

Stage states: pending -> ready -> assigned -> running -> succeeded | failed | cancelled, plus
running/assigned -> ready when a failed attempt has retries left (a node declared lost fails its
attempts), pending/ready -> cancelled (cancel, or a dependency failed), and succeeded -> ready/pending
when an experiment without a shared workdir loses its home node for good and starts over elsewhere, or
an operator reruns it. Every change is a row in ``transitions`` with time and reason.

Every attempt that does not succeed ends with a failure class (``node_lost``, ``preempted``,
``cancelled``, ``error``, ``infra``) and is retried only while the stage's budget for that class lasts,
so that a machine fault never spends the budget of the stage's own code (``error``).

Memory only: every method changes the shared :class:`~master.state.ClusterState` and writes the rows
of the change into a :class:`~master.store.Changes` that the caller commits (``master/journal.py``).
Keeping the two in one place is what lets a failed commit be undone by reading the experiment back.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from infra.master import store
from infra.master.state import (
    ACTIVE,
    ASSIGNED,
    CANCELLED,
    FAILED,
    PENDING,
    READY,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    AttemptRt,
    ClusterState,
    ExperimentRt,
    StageRt,
    Stop,
)
from infra.master.store import Changes
from infra.spec.plan import DEFAULT_RETRIES, stage_nodes, stage_processes
from infra.spec.stages import Rendezvous, Resources, get_stage_kind, stage_kinds

NODE_LOST, PREEMPTED, CANCELLED_CLASS, ERROR, INFRA = "node_lost", "preempted", "cancelled", "error", "infra"


def stage_extras(kind: str, params: dict[str, Any]) -> frozenset[str]:
    """Optional node features a stage needs (e.g. the chgnet scorer); plugin kinds declare none here."""
    if kind not in stage_kinds():
        return frozenset()
    k = get_stage_kind(kind)
    return frozenset(k.extras(k.params.model_validate(params))) if k.extras else frozenset()


def _budgets(retries: dict[str, int] | None, max_retries: int) -> dict[str, int]:
    """A stage's retry budget per class as stored; a stage stored before budgets existed gets the defaults
    with ``max_retries`` as its ``error`` budget."""
    return {**DEFAULT_RETRIES, "error": max_retries, **(retries or {})}


class StageMachine:
    def __init__(
        self, state: ClusterState, *, wake: Callable[[], None], forgotten: Callable[[ExperimentRt], None]
    ) -> None:
        self.state = state
        self.wake = wake  # a stage that ended frees resources: the scheduler gets a pass
        self.forgotten = forgotten  # an experiment left memory: caches about it can go

    def move(
        self, st: StageRt, to: str, reason: str, ch: Changes, now: float, attempt: AttemptRt | None = None
    ) -> None:
        ch.transitions.append(
            {
                "stage_id": st.id,
                "attempt_id": attempt.id if attempt else None,
                "from_state": st.state,
                "to_state": to,
                "time": now,
                "reason": reason,
            }
        )
        ch.stages.append({"id": st.id, "state": to, "reason": reason, "updated_at": now, "attempts": st.attempts})
        ch.touched.add(st.exp)
        if st.state == READY:
            self.state.ready.discard(st)
        st.state, st.reason = to, reason
        if to == READY:
            self.state.ready.add(st)

    def cascade_cancel(self, st: StageRt, why: str, ch: Changes, now: float) -> None:
        """Cancel every stage waiting on ``st``, transitively: iterative, so a chain as long as the plan
        limit allows (1,000 stages) cannot exhaust the stack."""
        todo = [st]
        while todo:
            s = todo.pop()
            for d in s.dependents:
                if d.state in (PENDING, READY):
                    self.move(d, CANCELLED, f"dependency {s.name!r} {why}", ch, now)
                    todo.append(d)

    def finish(
        self, att: AttemptRt, state: str, exit_code: int, message: str, ch: Changes, now: float, cls: str = ""
    ) -> None:
        """End an attempt. A failed one is retried while its class's budget lasts (``cancelled`` never is,
        nor anything of an experiment being cancelled); otherwise the stage ends and what waits on it is
        cancelled. A gang's member ends alone; the gang ends when all its members succeeded, or at its first
        member that did not: the others are stopped and the gang is one attempt of that member's class."""
        if att.state in TERMINAL:
            return
        st, exp = att.stage, att.stage.exp
        if state != SUCCEEDED and not cls:
            cls = CANCELLED_CLASS if state == CANCELLED else ERROR
        if state == SUCCEEDED:
            cls = ""
        self._end(att, state, exit_code, message, cls, ch, now)
        ended = f"{state} (exit {exit_code}" + (f", {cls})" if cls else ")") + (f": {message}" if message else "")
        detail = f"attempt {att.number} {ended}"
        if st.gang():
            if state == SUCCEEDED and any(m.state != SUCCEEDED for m in st.members):
                self.wake()  # its node's resources are free; the stage goes on while other members run
                return
            if state == SUCCEEDED:
                detail = f"attempt {att.number} succeeded on all {len(st.members)} nodes"
            else:
                detail = f"attempt {att.number} member {att.rank} on {self._where(att)} {ended}"
                detail += self._stop_gang(att, state, cls, ch, now)
        if state == FAILED and cls != CANCELLED_CLASS and not exp.cancel_requested and att.number >= st.budget_from:
            st.used[cls] = st.used.get(cls, 0) + 1
        if state == SUCCEEDED:
            self.move(st, SUCCEEDED, detail, ch, now, att)
            for d in st.dependents:
                if d.state == PENDING and all(x.state == SUCCEEDED for x in d.deps):
                    self.move(d, READY, "dependencies succeeded", ch, now)
        elif state == FAILED and not exp.cancel_requested and cls != CANCELLED_CLASS and self._budget_left(st, cls):
            budget = st.retries.get(cls, 0)
            self.move(st, READY, f"{detail}; retry {st.used[cls]} of {budget} ({cls})", ch, now, att)
        else:
            final = CANCELLED if state == CANCELLED or exp.cancel_requested else FAILED
            self.move(st, final, detail, ch, now, att)
            self.cascade_cancel(st, final, ch, now)
        self.update_experiment(exp, ch, now)
        self.wake()

    def _end(self, att: AttemptRt, state: str, exit_code: int, message: str, cls: str, ch: Changes, now: float) -> None:
        """One attempt (or gang member) ends: its row, and what it held on its node."""
        att.state, att.failure_class = state, cls
        ch.attempts.append(
            {
                "id": att.id,
                "state": state,
                "exit_code": exit_code,
                "message": message[:4000],
                "finished_at": now,
                "failure_class": cls,
            }
        )
        ch.touched.add(att.stage.exp)
        node = self.state.nodes.get(att.node_id)
        if node is not None:
            node.release(att)

    def _where(self, att: AttemptRt) -> str:
        node = self.state.nodes.get(att.node_id)
        return node.name if node is not None else att.node_id

    def _stop_gang(self, first: AttemptRt, state: str, cls: str, ch: Changes, now: float) -> str:
        """The gang's first member to end badly ends the others: each is recorded ended with the gang's class
        (so the gang counts once, in that class) and its node told to stop its copy (now when its command
        stream is open, else when it reopens). Returns what the stage's reason adds."""
        why = f"stopped: member {first.rank} of the gang (on {self._where(first)}) {state}"
        stopped = []
        for m in first.stage.members:
            if m is first or m.state in TERMINAL:
                continue
            self._end(m, CANCELLED if state == CANCELLED else FAILED, -1, why, cls, ch, now)
            stopped.append(self._where(m))
            node = self.state.nodes.get(m.node_id)
            if node is not None and node.queue is not None:
                node.queue.put_nowait(Stop(attempt_id=m.id, lease=m.lease, reason=why))
            elif node is not None:
                node.pending_cancels.append((m.id, m.lease))
        return f"; stopped the other member{'s' if len(stopped) > 1 else ''} on {', '.join(stopped)}" if stopped else ""

    @staticmethod
    def _budget_left(st: StageRt, cls: str) -> bool:
        """The retries spent in ``cls`` (this failure included) are within the stage's budget for it."""
        return st.used.get(cls, 0) <= st.retries.get(cls, 0)

    def update_experiment(self, exp: ExperimentRt, ch: Changes, now: float) -> None:
        states = {s.state for s in exp.stages}
        row: dict[str, Any] = {"id": exp.id}
        if states <= TERMINAL:
            new = FAILED if FAILED in states else CANCELLED if CANCELLED in states else SUCCEEDED
            row["finished_at"] = now
            self.forget(exp)
        elif states & {ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED}:
            new = RUNNING
        else:
            new = PENDING
        if new not in TERMINAL:
            row["finished_at"] = None  # running again (rerun)
        if new != exp.state:
            exp.state = new
            ch.experiments.append({**row, "state": new})

    def forget(self, exp: ExperimentRt) -> None:
        """Memory holds unfinished experiments only."""
        self.state.experiments.pop(exp.key, None)
        self.forgotten(exp)
        for st in exp.stages:
            self.state.ready.discard(st)
            for att_id in st.attempt_ids:
                self.state.attempts.pop(att_id, None)

    def drop(self, exp: ExperimentRt) -> None:
        """Forget an experiment and free what its attempts hold on the nodes."""
        for st in exp.stages:
            for att_id in st.attempt_ids:
                att = self.state.attempts.get(att_id)
                node = self.state.nodes.get(att.node_id) if att is not None else None
                if node is not None and att is not None:
                    node.release(att)
        self.forget(exp)

    def restore(self, snap: store.Snapshot, ch: Changes, now: float) -> None:
        """Rebuild experiments and their live attempts from the database (after a master restart, or to
        bring back one whose handler failed, or a finished one to run again). A stage left ``pending``
        whose dependency ended failed or cancelled (a master of an older release stopped half-way
        through a cascade) is cancelled now, and one whose dependencies all succeeded is made ready,
        into ``ch``."""
        by_id = {e["id"]: self._experiment(e) for e in snap.experiments}
        stages: dict[int, StageRt] = {}
        for s in snap.stages:
            st = stages[s["id"]] = self._stage(s, by_id[s["experiment_id"]], snap.used)
            st.exp.stages.append(st)
            if st.state == READY:
                self.state.ready.add(st)
        for sid, dep in snap.deps:
            stages[sid].deps.append(stages[dep])
            stages[dep].dependents.append(stages[sid])
        for a in snap.attempts:
            self._attempt(a, stages[a["stage_id"]])
        for exp in by_id.values():
            before = len(ch.transitions)
            for st in exp.stages:
                if st.state != PENDING:
                    continue
                ended = next((d for d in st.deps if d.state in (FAILED, CANCELLED)), None)
                if ended is not None:
                    self.move(st, CANCELLED, f"dependency {ended.name!r} {ended.state} (repaired at start)", ch, now)
                    self.cascade_cancel(st, ended.state, ch, now)
                elif st.deps and all(d.state == SUCCEEDED for d in st.deps):
                    self.move(st, READY, "dependencies succeeded (repaired at start)", ch, now)
            ended = exp.state not in TERMINAL and all(st.state in TERMINAL for st in exp.stages)
            if len(ch.transitions) != before or ended:  # an unfinished experiment whose stages all ended
                self.update_experiment(exp, ch, now)

    def _experiment(self, e: dict[str, Any]) -> ExperimentRt:
        exp = ExperimentRt(
            id=e["id"],
            key=e["key"],
            name=e["name"],
            priority=e["priority"],
            smoke=e["smoke"],
            shared_workdir=e["shared_workdir"],
            state=e["state"],
            cancel_requested=e["cancel_requested"],
            home_node=e["home_node_id"],
            owner=e["owner"],
            plan_json=json.dumps(e["plan"]),
        )
        self.state.experiments[exp.key] = exp
        return exp

    @staticmethod
    def _stage(s: dict[str, Any], exp: ExperimentRt, used: dict[int, dict[str, int]]) -> StageRt:
        return StageRt(
            id=s["id"],
            exp=exp,
            position=s["position"],
            name=s["name"],
            kind=s["kind"],
            params=s["params"],
            resources=Resources(
                s["gpus"],
                s["cpus"],
                s["memory_mib"],
                _plan_processes(exp.plan_json).get(s["name"], 1),
                _plan_nodes(exp.plan_json).get(s["name"], 1),
            ),
            max_retries=s["max_retries"],
            state=s["state"],
            attempts=s["attempts"],
            extras=stage_extras(s["kind"], s["params"]),
            reason=s["reason"],
            retries=_budgets(s.get("retries"), s["max_retries"]),
            budget_from=s.get("budget_from") or 1,
            used=dict(used.get(s["id"], {})),
        )

    def _attempt(self, a: dict[str, Any], st: StageRt) -> None:
        att = AttemptRt(
            id=a["id"],
            stage=st,
            number=a["number"],
            node_id=a["node_id"],
            lease=a["lease_token"],
            gpus=tuple(a["gpu_indices"]),
            state=a["state"],
            started_at=a["started_at"] or 0.0,
            failure_class=a.get("failure_class") or "",
            rank=a.get("rank") or 0,
            rendezvous=Rendezvous(**a["rendezvous"]) if a.get("rendezvous") else None,
        )
        if att.rank == 0:
            st.current = att
        st.members = sorted([*st.members, att], key=lambda m: m.rank)  # the rows of the latest number
        st.attempt_ids.append(att.id)
        self.state.attempts[att.id] = att
        if att.state in ACTIVE and att.node_id in self.state.nodes:
            self.state.nodes[att.node_id].allocate(att)


@functools.lru_cache(maxsize=4)
def _plan_nodes(plan_json: str) -> dict[str, int]:
    """:func:`stage_nodes` of an experiment's stored plan."""
    try:
        return stage_nodes(json.loads(plan_json))
    except ValueError:
        return {}


@functools.lru_cache(maxsize=4)
def _plan_processes(plan_json: str) -> dict[str, int]:
    """:func:`stage_processes` of an experiment's stored plan (its stages are restored one by one)."""
    try:
        return stage_processes(json.loads(plan_json))
    except ValueError:
        return {}
