"""The master's database schema (SQLAlchemy 2). Times are Unix seconds (float) everywhere, like events.

Experiment, stage and attempt ids are allocated by the master process (the database's only writer)
so that an assignment can be sent without a round trip for its id.

Changes go through an Alembic migration in ``master/migrations/versions``; a test checks that the
migrated schema equals this metadata.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # persistent, kept in the node's workdir
    name: Mapped[str] = mapped_column(String(255))
    hostname: Mapped[str] = mapped_column(String(255))
    protocol_version: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[float] = mapped_column(Float)  # advertised
    memory_mib: Mapped[int] = mapped_column(BigInteger)  # advertised
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)  # software, extras, stage kinds, nvml, workdir, disk
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen_at: Mapped[float] = mapped_column(Float)  # persisted periodically, not per heartbeat
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    drained: Mapped[bool] = mapped_column(Boolean, default=False)  # by an operator: no new stages
    drain_deadline: Mapped[float | None] = mapped_column(Float, nullable=True)  # then what runs is preempted


class Gpu(Base):
    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("node_id", "index", name="uq_gpus_node_index"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    uuid: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(255))
    memory_mib: Mapped[int] = mapped_column(BigInteger)
    driver_version: Mapped[str] = mapped_column(String(64))


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)  # ids come from the master
    key: Mapped[str] = mapped_column(String(128), unique=True)  # "<name>-<id>": ids users type, dir names
    name: Mapped[str] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer)
    smoke: Mapped[bool] = mapped_column(Boolean)
    shared_workdir: Mapped[bool] = mapped_column(Boolean)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated, normalised plan
    state: Mapped[str] = mapped_column(String(16), index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    home_node_id: Mapped[str | None] = mapped_column(ForeignKey("nodes.id"), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # None without auth
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("experiment_id", "name", name="uq_stages_experiment_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # index in the plan: submission order within it
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    gpus: Mapped[int] = mapped_column(Integer)
    cpus: Mapped[float] = mapped_column(Float)
    memory_mib: Mapped[int] = mapped_column(BigInteger)
    max_retries: Mapped[int] = mapped_column(Integer)  # the `error` budget (also in retries)
    retries: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)  # budget per failure class
    budget_from: Mapped[int] = mapped_column(Integer, default=1)  # attempts from this number count (rerun)
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)


class StageDependency(Base):
    __tablename__ = "stage_dependencies"

    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"), primary_key=True)
    depends_on_id: Mapped[int] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"), primary_key=True)


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("stage_id", "number", "rank", name="uq_attempts_stage_number_rank"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer, default=0)  # the member of a gang (K rows share the number)
    rendezvous: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # a gang member's
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), index=True)
    lease_token: Mapped[str] = mapped_column(String(64))
    gpu_indices: Mapped[list[int]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    failure_class: Mapped[str] = mapped_column(String(16), default="")  # node_lost | preempted | ... ; "" if ok
    assigned_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Event(Base):
    """What a stage attempt reported: log lines, metrics, artifacts, progress; (attempt, seq) unique."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("attempt_id", "seq", name="uq_events_attempt_seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    attempt_id: Mapped[int] = mapped_column(ForeignKey("attempts.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(16))  # log | metric | artifact | progress
    time: Mapped[float] = mapped_column(Float)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Transition(Base):
    """Every stage state change, with when and why."""

    __tablename__ = "transitions"
    __table_args__ = (Index("ix_transitions_stage", "stage_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"))
    attempt_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    from_state: Mapped[str] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    time: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(Text)


class Token(Base):
    """An access token: only the SHA-256 of its secret is kept; the token itself is shown once."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(64))  # the user, or a join token's label
    role: Mapped[str] = mapped_column(String(16))  # user | admin | node
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
