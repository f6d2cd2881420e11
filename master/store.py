"""The master's repository: a handful of write units (run by the writer thread) and read queries.

Writes take a :class:`Session` inside the writer's transaction and use bulk statements; reads open
their own short session. Rows cross this boundary as plain dicts and small dataclasses, never ORM
objects, so nothing lazy-loads in another thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, bindparam, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from infra.master.models import Attempt, Event, Experiment, Gpu, Node, Stage, StageDependency, Transition

TERMINAL = ("succeeded", "failed", "cancelled")
# the failure classes that a gang's attempt can be charged to, most innocent first: a gang takes the first that
# any member ended with on its own, so a machine fault that also broke the others' collectives is not `error`
INNOCENCE = ("node_lost", "preempted", "infra", "error")


@dataclass
class Changes:
    """One unit of state change: rows to insert and rows to update by primary key.

    The writer merges the Changes queued together into one (a row updated twice keeps the last value
    of each column) and applies it with one executemany per table and column set.
    """

    experiments: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    new_attempts: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    # the experiments (master.state.ExperimentRt) whose memory this change touches: read back from the
    # database if it cannot be committed; not written, not merged
    touched: set[Any] = field(default_factory=set, compare=False, repr=False)

    def __bool__(self) -> bool:
        return any((self.experiments, self.stages, self.new_attempts, self.attempts, self.transitions))

    def extend(self, other: Changes) -> None:
        for name in ("experiments", "stages", "new_attempts", "attempts", "transitions"):
            getattr(self, name).extend(getattr(other, name))

    def apply(self, s: Session) -> None:
        conn = s.connection()
        if self.new_attempts:
            conn.execute(insert(Attempt.__table__), self.new_attempts)
        for model, rows in ((Experiment, self.experiments), (Stage, self.stages), (Attempt, self.attempts)):
            for keys, group in _by_columns(rows).items():
                table = model.__table__
                stmt = update(table).where(table.c.id == bindparam("row_id"))
                conn.execute(stmt.values({k: bindparam(k) for k in keys}), group)
        if self.transitions:
            conn.execute(insert(Transition.__table__), self.transitions)


def _by_columns(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Rows merged per id (the last value of a column wins), grouped by the columns they set."""
    merged: dict[Any, dict[str, Any]] = {}
    for row in rows:
        merged.setdefault(row["id"], {}).update(row)
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row_id, row in merged.items():
        keys = tuple(sorted(k for k in row if k != "id"))
        out.setdefault(keys, []).append({"row_id": row_id, **{k: row[k] for k in keys}})
    return out


Rows = list[dict[str, Any]]


def create_experiment(s: Session, experiment: dict[str, Any], stages: Rows, deps: Rows, transitions: Rows) -> None:
    s.execute(insert(Experiment), [experiment])
    s.execute(insert(Stage), stages)
    if deps:
        s.execute(insert(StageDependency), deps)
    s.execute(insert(Transition), transitions)


@dataclass
class NewExperiment:
    """A submitted experiment as one writer unit: its transitions stay readable to what observes commits."""

    experiment: dict[str, Any]
    stages: Rows
    deps: Rows
    transitions: Rows

    def __call__(self, s: Session) -> None:
        create_experiment(s, self.experiment, self.stages, self.deps, self.transitions)


@dataclass
class Registrations:
    """Node registrations as one unit: node id -> (node row, its GPU rows).

    After a master restart every node registers at once; the writer merges the registrations queued
    together (a node registered twice keeps its last facts) and writes them with three statements, where
    one transaction per node, or three statements each, could not keep up with thousands of nodes."""

    nodes: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.nodes)

    def add(self, node: dict[str, Any], gpus: list[dict[str, Any]]) -> Registrations:
        self.nodes[node["id"]] = (node, [{**g, "node_id": node["id"]} for g in gpus])
        return self

    def extend(self, other: Registrations) -> None:
        self.nodes.update(other.nodes)

    def apply(self, s: Session) -> None:
        """Insert new nodes and update known ones (``registered_at`` is the first registration's), and
        replace their GPU rows; what an operator set (a drain) is kept."""
        if not self.nodes:
            return
        conn = s.connection()
        rows = [node for node, _ in self.nodes.values()]
        ins = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[conn.dialect.name](Node.__table__)
        kept = ("id", "registered_at")
        stmt = ins.on_conflict_do_update(
            index_elements=["id"], set_={k: ins.excluded[k] for k in rows[0] if k not in kept}
        )
        conn.execute(stmt, rows)
        gpu_table = Gpu.__table__
        conn.execute(delete(gpu_table).where(gpu_table.c.node_id.in_(list(self.nodes))))
        gpus = [g for _, node_gpus in self.nodes.values() for g in node_gpus]
        if gpus:
            conn.execute(insert(gpu_table), gpus)


def set_drain(s: Session, node_id: str, drained: bool, deadline: float | None) -> None:
    s.execute(update(Node).where(Node.id == node_id).values(drained=drained, drain_deadline=deadline))


def save_heartbeats(s: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        s.execute(update(Node), rows)


def insert_events(s: Session, rows: list[dict[str, Any]]) -> int:
    """Store events once: a (attempt_id, seq) already stored is skipped. Returns how many were new."""
    dialect = s.get_bind().dialect.name
    ins = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}[dialect](Event)
    stmt = ins.on_conflict_do_nothing(index_elements=["attempt_id", "seq"]).returning(Event.id)
    return len(s.execute(stmt, rows).all())


# --- reads -----------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What the master needs in memory at start: all nodes and every unfinished experiment."""

    max_ids: dict[str, int]
    nodes: list[dict[str, Any]]
    experiments: list[dict[str, Any]]
    stages: list[dict[str, Any]]
    deps: list[tuple[int, int]]
    attempts: list[dict[str, Any]]  # the latest attempt of each stage of those experiments
    used: dict[int, dict[str, int]] = field(default_factory=dict)  # stage id -> retries spent per class


def _rows(s: Session, stmt: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in s.execute(stmt)]


def _cols(model: Any) -> list[Any]:
    return list(model.__table__.columns)


def load_snapshot(engine: Engine) -> Snapshot:
    with Session(engine) as s:
        max_ids = {
            name: s.scalar(select(func.coalesce(func.max(model.id), 0))) or 0
            for name, model in (("experiment", Experiment), ("stage", Stage), ("attempt", Attempt))
        }
        nodes = _rows(s, select(*_cols(Node)))
        gpus = _rows(s, select(*_cols(Gpu)).order_by(Gpu.node_id, Gpu.index))
        for n in nodes:
            n["gpus"] = [g for g in gpus if g["node_id"] == n["id"]]
        exps = _rows(s, select(*_cols(Experiment)).where(Experiment.state.not_in(TERMINAL)))
        stages, deps, attempts, used = _experiment_rows(s, [e["id"] for e in exps])
    return Snapshot(max_ids, nodes, exps, stages, deps, attempts, used)  # type: ignore[arg-type]


def load_experiment(s: Session, key: str) -> Snapshot:
    """One experiment, finished or not, as a :class:`Snapshot` (read in the writer's session, so after
    every change queued before it)."""
    exps = _rows(s, select(*_cols(Experiment)).where(Experiment.key == key))
    stages, deps, attempts, used = _experiment_rows(s, [e["id"] for e in exps])
    return Snapshot({}, [], exps, stages, deps, attempts, used)


def _experiment_rows(s: Session, ids: list[int]) -> tuple[Any, Any, Any, Any]:
    """Stages, dependencies, the latest attempt of each stage (every member of a gang's), and the retries each
    stage has spent per failure class (attempts from its ``budget_from`` on, a gang's once, in its members'
    most innocent class; ``cancelled`` is never retried)."""
    stages = _rows(s, select(*_cols(Stage)).where(Stage.experiment_id.in_(ids)).order_by(Stage.id))
    sids = [st["id"] for st in stages]
    dep_q = select(StageDependency.stage_id, StageDependency.depends_on_id)
    deps = [(a, b) for a, b in s.execute(dep_q.where(StageDependency.stage_id.in_(sids)))]
    latest = select(Attempt.stage_id, func.max(Attempt.number).label("n")).where(Attempt.stage_id.in_(sids))
    latest = latest.group_by(Attempt.stage_id).subquery()
    attempts = _rows(
        s,
        select(*_cols(Attempt)).join(latest, (Attempt.stage_id == latest.c.stage_id) & (Attempt.number == latest.c.n)),
    )
    # one class per attempt number: a gang's members each keep their own, and the gang counts once, in the
    # most innocent of them; a number with a member still active is not yet
    # decided and counts nothing (a master restarted in the middle of an ending gang decides it later)
    undecided = len(INNOCENCE)
    rank = case({c: i for i, c in enumerate(INNOCENCE)}, value=Attempt.failure_class, else_=undecided)
    active = case((Attempt.state.in_(("assigned", "running")), 1), else_=0)
    per_number = (
        select(Attempt.stage_id, func.min(rank).label("cls"))
        .join(Stage, Stage.id == Attempt.stage_id)
        .where(Attempt.stage_id.in_(sids), Attempt.number >= Stage.budget_from)
        .group_by(Attempt.stage_id, Attempt.number)
        .having(func.max(active) == 0)
        .subquery()
    )
    spent = (
        select(per_number.c.stage_id, per_number.c.cls, func.count())
        .where(per_number.c.cls < undecided)
        .group_by(per_number.c.stage_id, per_number.c.cls)
    )
    used: dict[int, dict[str, int]] = {}
    for sid, cls, n in s.execute(spent):
        used.setdefault(sid, {})[INNOCENCE[cls]] = n
    return stages, deps, attempts, used


def attempt_brief(engine: Engine, attempt_id: int) -> tuple[str, str, str] | None:
    """(lease token, node, state) of an attempt."""
    with Session(engine) as s:
        row = s.execute(
            select(Attempt.lease_token, Attempt.node_id, Attempt.state).where(Attempt.id == attempt_id)
        ).first()
        return (row[0], row[1], row[2]) if row else None


def experiment_state(engine: Engine, key: str) -> str | None:
    with Session(engine) as s:
        return s.scalar(select(Experiment.state).where(Experiment.key == key))


def experiment_owner(engine: Engine, key: str) -> tuple[bool, str | None]:
    """(whether the experiment exists, its owner)."""
    with Session(engine) as s:
        row = s.execute(select(Experiment.owner).where(Experiment.key == key)).first()
        return (row is not None, row[0] if row is not None else None)


def status(
    engine: Engine, key: str | None, limit: int, owner: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """Experiments (newest first; one by key, with its transitions) with stages and attempts; with
    ``owner``, only that user's; with ``state``, only those in it."""
    with Session(engine) as s:
        q = select(*_cols(Experiment))
        if owner is not None:
            q = q.where(Experiment.owner == owner)
        if state is not None:
            q = q.where(Experiment.state == state)
        q = q.where(Experiment.key == key) if key else q.order_by(Experiment.id.desc()).limit(limit)
        exps = _rows(s, q)
        ids = [e["id"] for e in exps]
        stages = _rows(s, select(*_cols(Stage)).where(Stage.experiment_id.in_(ids)).order_by(Stage.position))
        sids = [st["id"] for st in stages]
        names = {st["id"]: st["name"] for st in stages}
        attempts = _rows(
            s,
            select(*_cols(Attempt), Node.name.label("node_name"))
            .join(Node, Node.id == Attempt.node_id)
            .where(Attempt.stage_id.in_(sids))
            .order_by(Attempt.number, Attempt.rank),
        )
        deps = s.execute(select(StageDependency).where(StageDependency.stage_id.in_(sids))).scalars().all()
        transitions = (
            _rows(s, select(*_cols(Transition)).where(Transition.stage_id.in_(sids)).order_by(Transition.id))
            if key
            else []
        )
    for st in stages:
        st["after"] = [names[d.depends_on_id] for d in deps if d.stage_id == st["id"]]
        st["attempt_rows"] = [a for a in attempts if a["stage_id"] == st["id"]]
        st["transitions"] = [t for t in transitions if t["stage_id"] == st["id"]]
    for e in exps:
        e["stages"] = [st for st in stages if st["experiment_id"] == e["id"]]
    return exps


def find_stage(engine: Engine, experiment: str, stage: str, stage_id: int) -> dict[str, Any] | None:
    with Session(engine) as s:
        q = select(Stage.id, Stage.name, Stage.state, Experiment.key, Experiment.owner).join(Experiment)
        q = q.where(Stage.id == stage_id) if stage_id else q.where(Experiment.key == experiment, Stage.name == stage)
        row = s.execute(q).first()
        return dict(row._mapping) if row else None


def stage_state(engine: Engine, stage_id: int) -> str:
    with Session(engine) as s:
        return s.scalar(select(Stage.state).where(Stage.id == stage_id)) or ""


def latest_attempt(engine: Engine, stage_id: int) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.max(Attempt.number)).where(Attempt.stage_id == stage_id)) or 0


def gang_size(engine: Engine, stage_id: int) -> int:
    """The members of a stage as its plan declares them (``resources.nodes``; 1: a plain stage), read from
    the stored plan so that a finished experiment's stage answers too."""
    with Session(engine) as s:
        row = s.execute(select(Stage.position, Experiment.plan).join(Experiment).where(Stage.id == stage_id)).first()
    if row is None:
        return 1
    return int(row.plan["stages"][row.position].get("resources", {}).get("nodes") or 1)


PAGE_SIZE = 5_000  # events per read of logs and metrics: what a read holds in memory at once
MAX_PAGE_SIZE = 10_000  # the most a client may ask for in one page


def events(
    engine: Engine,
    stage_id: int,
    types: tuple[str, ...],
    attempt: int | None,
    after_seq: int = 0,
    limit: int = PAGE_SIZE,
    after_attempt: int = 0,
    member: int = 0,
) -> Rows:
    """One page of events of the given types for a stage, by attempt then seq: of one attempt, after
    ``after_seq``; or of all attempts (``attempt`` None), after the keyset cursor ``(after_attempt,
    after_seq)``. At most ``limit`` rows: callers page on with the last row's (attempt, seq). Each member of a
    gang has its own seq per attempt, so one member's events are read at a time (``member``, its rank; 0 for a
    plain stage), which keeps (attempt, seq) one event."""
    with Session(engine) as s:
        q = (
            select(Attempt.number.label("attempt"), Event.seq, Event.type, Event.time, Event.data)
            .join(Attempt, Attempt.id == Event.attempt_id)
            .where(Attempt.stage_id == stage_id, Attempt.rank == member, Event.type.in_(types))
            .order_by(Attempt.number, Event.seq)
            .limit(limit)
        )
        if attempt is not None:
            q = q.where(Attempt.number == attempt, Event.seq > after_seq)
        elif after_attempt or after_seq:
            q = q.where(
                or_(Attempt.number > after_attempt, and_(Attempt.number == after_attempt, Event.seq > after_seq))
            )
        return _rows(s, q)


def artifacts(engine: Engine, key: str) -> list[dict[str, Any]]:
    with Session(engine) as s:
        q = (
            select(Stage.name.label("stage"), Attempt.number.label("attempt"), Attempt.node_id)
            .add_columns(Node.name.label("node_name"), Event.time, Event.data)
            .join(Attempt, Attempt.id == Event.attempt_id)
            .join(Stage, Stage.id == Attempt.stage_id)
            .join(Experiment, Experiment.id == Stage.experiment_id)
            .join(Node, Node.id == Attempt.node_id)
            .where(Experiment.key == key, Event.type == "artifact")
            .order_by(Stage.position, Attempt.number, Event.seq)
        )
        return _rows(s, q)


def artifact_holders(engine: Engine, key: str, reported_path: str) -> dict[str, Any] | None:
    """Where the files of experiment ``key`` are, for relaying one (None: no such experiment): its owner,
    whether its workdir is shared, and node ids most likely first: those that reported ``reported_path``
    as an artifact (latest first), its home node, the nodes of its attempts (latest first)."""
    with Session(engine) as s:
        exp = s.execute(
            select(Experiment.id, Experiment.owner, Experiment.shared_workdir, Experiment.home_node_id).where(
                Experiment.key == key
            )
        ).first()
        if exp is None:
            return None
        reported = s.execute(
            select(Attempt.node_id, Event.data)
            .join(Attempt, Attempt.id == Event.attempt_id)
            .join(Stage, Stage.id == Attempt.stage_id)
            .where(Stage.experiment_id == exp.id, Event.type == "artifact")
            .order_by(Event.time.desc())
        ).all()
        ran = s.execute(
            select(Attempt.node_id)
            .join(Stage, Stage.id == Attempt.stage_id)
            .where(Stage.experiment_id == exp.id)
            .order_by(Attempt.assigned_at.desc())
        ).scalars()
        nodes = [n for n, data in reported if (data or {}).get("path") == reported_path]
        nodes += [exp.home_node_id] if exp.home_node_id else []
        nodes += list(ran)
    return {"owner": exp.owner, "shared_workdir": bool(exp.shared_workdir), "nodes": list(dict.fromkeys(nodes))}
