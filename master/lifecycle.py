"""The stage state machine: transitions, the end of an attempt, retry budgets, the cascade, experiment state.

Stage states: pending -> ready -> assigned -> running -> succeeded | failed | cancelled, plus
running/assigned -> ready when a failed attempt has retries left (a node declared lost fails its
attempts), pending/ready -> cancelled (cancel, or a dependency failed), and succeeded -> ready/pending
when an experiment without a shared workdir loses its home node for good and starts over elsewhere, or
an operator reruns it. Every change is a row in ``transitions`` with time and reason.

Every attempt that does not succeed ends with a failure class (``node_lost``, ``preempted``,
``cancelled``, ``error``, ``infra``) and is retried only while the stage's budget for that class lasts,
so that a machine fault never spends the budget of the stage's own code (``error``). A gang (a stage on
K nodes) is one attempt of K members: the first member to end badly has the others stopped, and once every
member has ended the gang takes the most innocent class a member ended with on its own (``node_lost`` >
``preempted`` > ``infra`` > ``error``; cancelled members do not vote), charged once.

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
from infra.master.store import INNOCENCE, Changes
from infra.spec.plan import DEFAULT_RETRIES, stage_nodes, stage_processes
from infra.spec.stages import Rendezvous, Resources, get_stage_kind, stage_kinds

NODE_LOST, PREEMPTED, CANCELLED_CLASS, ERROR, INFRA = "node_lost", "preempted", "cancelled", "error", "infra"
MESSAGE_IN_REASON = 300  # of each member's message, in a gang's reason (K members' messages in one row)


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
        cancelled. A gang's member ends alone (:meth:`_member_ended`): the gang is decided once all have."""
        if att.state in TERMINAL:
            return
        if state != SUCCEEDED and not cls:
            cls = CANCELLED_CLASS if state == CANCELLED else ERROR
        if state == SUCCEEDED:
            cls = ""
        self._end(att, state, exit_code, message, cls, ch, now)
        if att.stage.gang():
            self._member_ended(att, ch, now)
        else:
            ended = f"{state} (exit {exit_code}" + (f", {cls})" if cls else ")") + (f": {message}" if message else "")
            self._decide(att, state, cls, f"attempt {att.number} {ended}", ch, now)

    def _decide(self, att: AttemptRt, state: str, cls: str, detail: str, ch: Changes, now: float) -> None:
        """The stage's attempt (a gang's: all its members) has ended as ``state`` in class ``cls``: charge
        the budget (once), then retry, fail or succeed the stage."""
        st, exp = att.stage, att.stage.exp
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

    def _member_ended(self, att: AttemptRt, ch: Changes, now: float) -> None:
        """A gang's member ended. The first to end badly has the others stopped at once (their resources are
        released as each ends), but the gang is decided only once every member has ended: a machine that
        dies usually breaks the other members' collectives (they exit ``error``) before its node is declared
        lost, and the gang must be charged to that loss, not to the stage's own code. Until then the stage
        keeps its state, says it is stopping, and nothing of it is placed again."""
        st = att.stage
        active = [m for m in st.members if m.state not in TERMINAL]
        if not active:
            self._decide_gang(st, ch, now)
            return
        first_bad = att.state != SUCCEEDED and not any(
            m is not att and m.state in (FAILED, CANCELLED) for m in st.members
        )
        if first_bad:
            why = f"stopped: member {att.rank} of the gang (on {self._where(att)}) {att.state}"
            for m in active:
                self._stop_member(m, why, now)
            others = ", ".join(self._where(m) for m in active)
            reason = f"attempt {att.number} stopping: member {att.rank} on {self._where(att)} {self._ended(att)}"
            reason += f"; stopping the other member{'s' if len(active) > 1 else ''} on {others}"
            st.reason = reason
            ch.stages.append({"id": st.id, "reason": reason, "updated_at": now})
        self.wake()  # its node's resources are free

    def _stop_member(self, m: AttemptRt, why: str, now: float) -> None:
        """Tell a member's node to stop it: now when its command stream is open, else when it reopens
        (``master/nodes.py`` sends the Stop of every stopping member then)."""
        m.stop_at, m.stop_why = now, why
        self.state.stopping[m.id] = m
        node = self.state.nodes.get(m.node_id)
        if node is not None and node.queue is not None:
            node.queue.put_nowait(Stop(attempt_id=m.id, lease=m.lease, reason=why))

    def _decide_gang(self, st: StageRt, ch: Changes, now: float) -> None:
        """Every member has ended: the gang is one attempt of the most innocent class any member ended with
        on its own (``node_lost`` > ``preempted`` > ``infra`` > ``error``); members that were cancelled
        (stopped by the master, or an experiment cancel) do not vote, and a gang with no vote is cancelled."""
        members = st.members
        if all(m.state == SUCCEEDED for m in members):
            self._decide(
                members[0], SUCCEEDED, "", f"attempt {members[0].number} succeeded on all {len(members)} nodes", ch, now
            )
            return
        voters = sorted(
            (m for m in members if m.state == FAILED and m.failure_class in INNOCENCE),
            key=lambda m: (INNOCENCE.index(m.failure_class), m.ended_at, m.rank),
        )
        if voters:
            first, state, cls = voters[0], FAILED, voters[0].failure_class
        else:
            first = min((m for m in members if m.state != SUCCEEDED), key=lambda m: (m.ended_at, m.rank))
            state, cls = CANCELLED, CANCELLED_CLASS
        named = [first, *sorted((m for m in voters if m is not first), key=lambda m: (m.ended_at, m.rank))]
        detail = f"attempt {first.number}: " + "; ".join(
            f"member {m.rank} on {self._where(m)} {self._ended(m)}" for m in named
        )
        stopped = [self._where(m) for m in members if m not in named and m.state != SUCCEEDED]
        if stopped:
            detail += f"; stopped the other member{'s' if len(stopped) > 1 else ''} on {', '.join(stopped)}"
        self._decide(first, state, cls, detail, ch, now)

    @staticmethod
    def _ended(att: AttemptRt) -> str:
        cls = att.failure_class
        return (
            f"{att.state} (exit {att.exit_code}"
            + (f", {cls})" if cls else ")")
            + (f": {att.message[:MESSAGE_IN_REASON]}" if att.message else "")
        )

    def _end(self, att: AttemptRt, state: str, exit_code: int, message: str, cls: str, ch: Changes, now: float) -> None:
        """One attempt (or gang member) ends: its row (a gang member's with its own class: a restarted master
        decides an ending gang from these rows), and what it held on its node."""
        att.state, att.failure_class = state, cls
        att.exit_code, att.message, att.ended_at = exit_code, message[:4000], now
        self.state.stopping.pop(att.id, None)
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
                self.state.stopping.pop(att_id, None)

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
        for st in stages.values():
            if st.state in ACTIVE and st.gang():
                self._restore_gang(st, now)
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

    def _restore_gang(self, st: StageRt, now: float) -> None:
        """A gang that was ending when the master stopped: its members' rows say so (one ended badly, some
        have not ended). Each member's end is committed as one unit with its own class, and the gang's
        decision (stage move, budget) in the same unit as the last member's end, so every prefix of the
        commits restores to a state the running master could have been in: the members still running are
        told to stop again (the Stops were memory only) and the gang is decided once they end. The budget
        spent is counted from the rows per attempt number and leaves out a number with a member still active
        (``store._experiment_rows``), so an undecided gang is charged once, when decided."""
        active = [m for m in st.members if m.state not in TERMINAL]
        if not active or not any(m.state in (FAILED, CANCELLED) for m in st.members):
            return
        first = min((m for m in st.members if m.state in (FAILED, CANCELLED)), key=lambda m: (m.ended_at, m.rank))
        for m in active:
            self._stop_member(
                m, f"stopped: member {first.rank} of the gang (on {self._where(first)}) {first.state}", now
            )

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
            exit_code=a.get("exit_code") or 0,
            message=a.get("message") or "",
            ended_at=a.get("finished_at") or 0.0,
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
