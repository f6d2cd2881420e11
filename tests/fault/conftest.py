"""Fixtures of the fault-injection suite: real master and agent processes, one database per module.

Every test module gets one fresh database per backend (SQLite, and PostgreSQL from
``$INFRA_TEST_POSTGRES_URL``, created here and dropped afterwards); each test starts its own master on it.
Everything started is stopped at teardown, also when a test fails, including stage processes whose agent
was killed on purpose.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from control import conftest as control_conftest
from control.conftest import POSTGRES_DEFAULT, Cluster
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from fault.proxy import Proxy


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def module_db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'master.db'}"
        return
    base = os.environ.get("INFRA_TEST_POSTGRES_URL", POSTGRES_DEFAULT)
    admin = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        conn = admin.connect()
    except Exception as e:  # no server: the PostgreSQL half of the suite is skipped, named
        admin.dispose()
        pytest.skip(f"PostgreSQL at {base} does not answer: {str(e).splitlines()[0]}")
    name = f"infra_fault_{uuid.uuid4().hex[:12]}"
    conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.close()
        admin.dispose()


@pytest.fixture
def db_url(module_db: str) -> str:
    """The database of this test's module, for ``cluster``."""
    return module_db


cluster = control_conftest.cluster  # the control suite's fixture: a Cluster on ``db_url``, stopped at teardown


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[Any]:
    """A proxy to this test's master; create it after ``cluster.start_master()``."""
    made: list[Proxy] = []

    def make() -> Proxy:
        made.append(Proxy(cluster.port))
        return made[-1]

    try:
        yield make
    finally:
        for p in made:
            p.close()


def stored_events(db_url: str, experiment: str, stage: str) -> dict[int, list[dict[str, Any]]]:
    """What the master stored for a stage, straight from its database: attempt number -> events by seq."""
    from infra.master.models import Attempt, Event, Experiment, Stage

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Attempt.number, Event.seq, Event.type, Event.data)
                .join(Attempt, Attempt.id == Event.attempt_id)
                .join(Stage, Stage.id == Attempt.stage_id)
                .join(Experiment, Experiment.id == Stage.experiment_id)
                .where(Experiment.key == experiment, Stage.name == stage)
                .order_by(Attempt.number, Event.seq)
            ).all()
    finally:
        engine.dispose()
    out: dict[int, list[dict[str, Any]]] = {}
    for number, seq, type_, data in rows:
        out.setdefault(number, []).append({"seq": seq, "type": type_, **data})
    return out


def expected_stream(params: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The stdout lines and metric steps a ``stream`` stage (tests/control/stagekit.py, whose defaults these
    are) writes. Computed here: importing the stage kit would register its kinds in this process."""
    p = {"lines": 100, "width": 12, "metric_every": 10, **params}
    lines = [f"line {i} ".ljust(p["width"], ".") for i in range(p["lines"])]
    return lines, [i for i in range(p["lines"]) if i % p["metric_every"] == 0]


def assert_stream_exactly_once(events: list[dict[str, Any]], params: dict[str, Any]) -> None:
    """Every line, metric and artifact the ``stream`` stage wrote is stored once, in order, nothing else."""
    lines, steps = expected_stream(params)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"seq gaps or repeats: {seqs[:50]}..."
    stdout = [e["text"] for e in events if e["type"] == "log" and e["stream"] == "stdout"]
    assert stdout == lines, _diff(stdout, lines)
    assert [e["step"] for e in events if e["type"] == "metric"] == steps
    assert [e["path"].rsplit("/", 1)[-1] for e in events if e["type"] == "artifact"] == ["out.txt"]
    assert not [e for e in events if e["type"] == "log" and e["stream"] == "stderr"]
    agent = [e["text"] for e in events if e["type"] == "log" and e["stream"] == "agent"]
    assert len([t for t in agent if t.startswith("$ ")]) == 1
    assert not [t for t in agent if not t.startswith(("$ ", "adopted step"))], agent


def _diff(got: list[str], want: list[str]) -> str:
    dup = sorted({x for x in got if got.count(x) > 1})[:5]
    missing = [x for x in want if x not in set(got)][:5]
    return f"{len(got)} lines stored, {len(want)} written; duplicated {dup}, missing {missing}"


def stage(exp: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in exp["stages"] if s["name"] == name)


def stored_count(db_url: str, experiment: str, stage_name: str) -> int:
    return sum(len(v) for v in stored_events(db_url, experiment, stage_name).values())
