"""Engine creation and schema migrations (Alembic, run programmatically to head at master start)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def default_db_url() -> str:
    from infra.spec.workdir import config_dir

    return f"sqlite:///{config_dir() / 'master.db'}"


def make_engine(url: str) -> Engine:
    """One engine per process. SQLite gets WAL (readers never block the writer), a busy timeout and
    enforced foreign keys; PostgreSQL connections are checked before use."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        return engine
    # psycopg2 sends an UPDATE executemany (the periodic heartbeat rows of every node, a pass's stage
    # updates) one row per round trip unless asked to batch it: 10,000 nodes' heartbeats took seconds and
    # held the single writer, and every commit behind it, for that long
    batch = {"executemany_mode": "values_plus_batch", "executemany_batch_page_size": 500}
    extra = batch if u.get_driver_name() == "psycopg2" else {}
    return create_engine(u, pool_pre_ping=True, pool_size=8, max_overflow=4, **extra)


def alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is already there)."""
    from alembic import command

    command.upgrade(alembic_config(engine), "head")
