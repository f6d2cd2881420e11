"""A master process for the control-plane benchmarks (bench/master_load.py, bench/soak.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_master(db_url: str, tmp: Path, *flags: str, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    """``infra master`` on 127.0.0.1 (``port`` 0: any free one) with its log appended to ``tmp/master.log``;
    returns the process and the address it printed once listening."""
    log = (tmp / "master.log").open("a")
    cmd = [sys.executable, "-m", "infra.cli", "master", "--db", db_url, "--bind", f"127.0.0.1:{port}", *flags]
    env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on " in line:
                found.append(line.split("listening on ", 1)[1].split()[0])

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the master did not start:\n{(tmp / 'master.log').read_text()}")
        time.sleep(0.05)
    return proc, found[0]


def postgres_database(url: str, prefix: str) -> tuple[str, Callable[[], None]]:
    """A fresh database on the server of ``url`` (the URL of it, and a function that drops it)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return make_url(url).set(database=name).render_as_string(hide_password=False), drop
