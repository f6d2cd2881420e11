"""Fixtures for the control plane: real master and node processes on loopback, SQLite or PostgreSQL.

Every process started here is stopped at teardown (also when a test fails); every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.demo import start_master, stop

STAGEKIT = Path(__file__).resolve().parent / "stagekit.py"
POSTGRES_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: it exists and is no zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


class Cluster:
    """A master and node agents as subprocesses (``python -m infra.cli ...``), plus CLI calls.

    ``master_args`` are kept for restarts: :meth:`restart_master` starts a new master on the same port
    and database, as an operator would after a crash."""

    def __init__(self, tmp: Path, db_url: str) -> None:
        self.tmp, self.db_url = tmp, db_url
        self.env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp / "config"), "INFRA_STAGE_MODULES": str(STAGEKIT)}
        self.env.pop("INFRA_MASTER", None)
        self.env.pop("INFRA_TOKEN", None)
        self.procs: list[subprocess.Popen[Any]] = []
        self.address = ""
        self.dashboard = ""  # the master's dashboard URL, as it printed it
        self.master: subprocess.Popen[Any] | None = None
        self.master_args: tuple[str, ...] = ()
        self.nodes: dict[str, subprocess.Popen[Any]] = {}
        self.client_args: list[str] = []  # e.g. TLS flags every CLI call gets

    def start_master(self, *args: str, port: int = 0, heartbeat: float = 1.0) -> str:
        self.master_args = args
        flags = ("--heartbeat", str(heartbeat), *args)
        self.master, self.address, self.dashboard = start_master(
            self.db_url, self.env, self.tmp / "master.log", *flags, port=port
        )
        self.procs.append(self.master)
        return self.address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def kill_master(self) -> None:
        """kill -9: no goodbye, no flush."""
        assert self.master is not None
        self.master.send_signal(signal.SIGKILL)
        self.master.wait(10)

    def restart_master(self) -> str:
        return self.start_master(*self.master_args, port=self.port)

    def _dead(self, what: str) -> None:
        raise AssertionError(f"the {what} exited early:\n" + (self.tmp / f"{what}.log").read_text())

    def start_node(
        self,
        name: str,
        *args: str,
        master: str | None = None,
        heartbeat: float = 0.5,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[Any]:
        log = (self.tmp / f"{name}.log").open("a")
        cmd = [sys.executable, "-m", "infra.cli", "node", "--master", master or self.address, "--name", name]
        # --stop-deadline 0: a node stopped at teardown stops its stages at once (a test may pass its own)
        cmd += ["--workdir", str(self.workdir(name)), "--heartbeat", str(heartbeat), "--stop-deadline", "0", *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})})
        self.procs.append(proc)
        self.nodes[name] = proc
        return proc

    def workdir(self, name: str) -> Path:
        return self.tmp / f"work-{name}"

    def kill_node(self, name: str) -> None:
        """kill -9 of the agent only: its stages run on (they are in their own sessions)."""
        proc = self.nodes[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "infra.cli", *args, "--master", self.address, *self.client_args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=timeout, cwd=self.tmp
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def status(self, experiment: str | None = None) -> dict[str, Any]:
        return json.loads(self.cli("status", *([experiment] if experiment else []), "--json").stdout)

    def wait_online(self, *names: str, timeout: float = 60) -> dict[str, Any]:
        def online() -> dict[str, Any] | None:
            nodes = {n["name"]: n for n in self.status()["nodes"] if n["online"]}
            return nodes if set(names) <= set(nodes) else None

        return wait_for(online, timeout, f"node(s) {', '.join(names)} to be online")

    def submit(self, plan: dict[str, Any]) -> str:
        path = self.tmp / f"plan-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(plan))
        return self.cli("submit", str(path)).stdout.strip()

    def wait_finished(self, key: str, timeout: float = 90) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            exp = self.status(key)["experiments"][0]
            return exp if exp["state"] in ("succeeded", "failed", "cancelled") else None

        return wait_for(done, timeout, f"experiment {key} to finish", interval=0.5)

    wait_for = staticmethod(wait_for)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # nodes first: they stop their stages
            stop(proc)
        kill_leftover_stages(self.tmp)


def kill_leftover_stages(tmp: Path) -> None:
    """Stage processes whose agent was killed -9 and never restarted outlive it by design; end them."""
    from infra.node.runner import same_process

    for record in tmp.glob("work-*/experiments/*/work/*/.infra/attempt-*/run.json"):
        try:
            run = json.loads(record.read_text())
            if same_process(
                run["pid"], run["start_time"], run.get("ident")
            ):  # never a later process that reuses the pid
                os.killpg(run["pid"], signal.SIGKILL)
        except (ValueError, KeyError, ProcessLookupError, PermissionError):
            continue


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "config"
    monkeypatch.setenv("INFRA_CONFIG_DIR", str(d))
    return d


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A freshly created PostgreSQL database, dropped afterwards; skipped when no server answers."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.engine import make_url

    base = os.environ.get("INFRA_TEST_POSTGRES_URL", POSTGRES_DEFAULT)
    admin = sqlalchemy.create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        conn = admin.connect()
    except sqlalchemy.exc.OperationalError as e:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {base} does not answer: {str(e).splitlines()[0]}")
    name = f"infra_test_{uuid.uuid4().hex[:12]}"
    conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.close()
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'master.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, db_url)
    try:
        yield c
    finally:
        c.stop()
