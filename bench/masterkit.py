"""A master and a fresh PostgreSQL database for the control-plane benchmarks (bench/master_load.py,
bench/soak.py)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from infra import demo

ROOT = Path(__file__).resolve().parents[1]


def start_master(db_url: str, tmp: Path, *flags: str, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    """:func:`infra.demo.start_master` with the benchmark's config directory and log in ``tmp``."""
    env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp)}
    proc, address, _ = demo.start_master(db_url, env, tmp / "master.log", *flags, port=port, cwd=ROOT)
    return proc, address


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
