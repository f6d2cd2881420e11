"""``infra master``: migrate the database, restore state, serve gRPC until SIGINT/SIGTERM.

The server is grpc.aio (asyncio) rather than the thread-pool API because every node holds one
assignment stream open for its lifetime: with a thread pool each stream pins a worker thread (1,000
nodes would mean 1,000 threads), while on asyncio an idle stream costs a coroutine. Database work
runs in threads beside the loop (one writer with group commit, a few readers).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import grpc

from master.controller import Controller
from master.db import make_engine, migrate
from master.service import ClientServicer, NodeServicer
from protos import infra_pb2_grpc

log = logging.getLogger("infra.master")
MAX_MESSAGE = 32 * 1024 * 1024


async def serve(db_url: str, bind: str, heartbeat_interval: float = 5.0, persist_interval: float = 10.0) -> None:
    engine = make_engine(db_url)
    await asyncio.get_running_loop().run_in_executor(None, migrate, engine)
    controller = Controller(engine, heartbeat_interval, persist_interval)
    await controller.start()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 20_000),  # notice dead node connections behind NAT
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
    )
    infra_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(controller), server)
    infra_pb2_grpc.add_ClientServiceServicer_to_server(ClientServicer(controller), server)
    port = server.add_insecure_port(bind)
    if port == 0:
        raise SystemExit(f"infra master: cannot listen on {bind}")
    await server.start()
    host = bind.rsplit(":", 1)[0]
    shown = engine.url.render_as_string(hide_password=True)
    print(f"infra master listening on {host}:{port} (database {shown})", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace=2)
    await controller.stop()
    engine.dispose()


def main(db_url: str, bind: str, heartbeat_interval: float = 5.0) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    asyncio.run(serve(db_url, bind, heartbeat_interval))
    return 0
