"""A Controller on a fresh SQLite database, for tests that drive it directly (no gRPC)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from infra.master.controller import Controller
from infra.master.db import make_engine, migrate


def run_controller(
    tmp_path: Path, scenario: Callable[[Controller], Awaitable[None]], url: str | None = None, **kw: Any
) -> None:
    """Start a Controller (``kw`` overrides its intervals) on ``url`` (default: a SQLite file in
    ``tmp_path``), run ``scenario`` with it, stop it."""

    async def main() -> None:
        engine = make_engine(url or f"sqlite:///{tmp_path / 'm.db'}")
        migrate(engine)
        c = Controller(engine, **{"heartbeat_interval": 1, "persist_interval": 10, **kw})
        await c.start()
        try:
            await scenario(c)
        finally:
            await c.stop()
            engine.dispose()

    asyncio.run(main())
