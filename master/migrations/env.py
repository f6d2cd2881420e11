"""Alembic environment: uses the engine the master passes in, or ``sqlalchemy.url`` from alembic.ini."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from infra.master.models import Base

config = context.config
engine = config.attributes.get("engine") or create_engine(config.get_main_option("sqlalchemy.url"))

with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    context.run_migrations()
