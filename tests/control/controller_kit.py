"""A Controller on a fresh SQLite database, for tests that drive it directly (no gRPC for the node side; the
client service on loopback for the `infra` verbs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Engine

from infra.master.config import ControllerOptions
from infra.master.controller import Controller
from infra.master.db import make_engine, migrate
from infra.master.service import ClientServicer
from infra.master.wire import NodeAPI, usage_row
from infra.protos import infra_pb2, infra_pb2_grpc


class WiredController(Controller):
    """A Controller that a test drives with the node protocol's messages, translated as the node servicer
    translates them (``master.wire.NodeAPI``); ``kw`` are its :class:`ControllerOptions`."""

    def __init__(self, engine: Engine, **kw: Any) -> None:
        super().__init__(engine, ControllerOptions(**kw), usage_row=usage_row)
        self.wire = NodeAPI(self)

    async def register(self, req: infra_pb2.RegisterRequest) -> infra_pb2.RegisterResponse:
        return await self.wire.register(req)

    def heartbeat(self, req: infra_pb2.HeartbeatRequest) -> infra_pb2.HeartbeatResponse:
        return self.wire.heartbeat(req)

    def assignments(self, node_id: str, session: int) -> AsyncIterator[infra_pb2.NodeCommand]:
        return self.wire.assignments(node_id, session)

    async def report_status(self, rep: infra_pb2.StageStatusReport) -> tuple[bool, str]:
        return await self.wire.report_status(rep)

    async def report_events(self, batch: infra_pb2.EventBatch) -> tuple[int, list[int]]:
        return await self.wire.report_events(batch)


@asynccontextmanager
async def started(engine: Engine, **kw: Any) -> AsyncIterator[WiredController]:
    """A started :class:`WiredController` on ``engine`` (``kw``: its options), stopped on the way out."""
    c = WiredController(engine, **kw)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@asynccontextmanager
async def client_api(c: Controller) -> AsyncIterator[str]:
    """The client service of ``c`` on a loopback port (its address): what the ``infra`` verbs talk to."""
    server = grpc.aio.server()
    infra_pb2_grpc.add_ClientServiceServicer_to_server(ClientServicer(c), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def run_controller(
    tmp_path: Path, scenario: Callable[[Controller], Awaitable[None]], url: str | None = None, **kw: Any
) -> None:
    """Start a Controller (``kw`` overrides its intervals) on ``url`` (default: a SQLite file in
    ``tmp_path``), run ``scenario`` with it, stop it."""

    async def main() -> None:
        engine = make_engine(url or f"sqlite:///{tmp_path / 'm.db'}")
        migrate(engine)
        try:
            async with started(engine, **{"heartbeat_interval": 1, "persist_interval": 10, **kw}) as c:
                await scenario(c)
        finally:
            engine.dispose()

    asyncio.run(main())
