"""``infra master``: migrate the database, restore state, serve gRPC until SIGINT/SIGTERM.

The server is grpc.aio (asyncio) rather than the thread-pool API because every node holds one
assignment stream open for its lifetime: with a thread pool each stream pins a worker thread (1,000
nodes would mean 1,000 threads), while on asyncio an idle stream costs a coroutine. Database work
runs in threads beside the loop (one writer with group commit, a few readers).

Security: with ``--auth`` every call needs a token (``master/auth.py``); ``--tls-cert/--tls-key`` serve
TLS, and ``--tls-ca`` additionally requires client certificates signed by that CA (mutual TLS). Without
``--auth`` the master only binds a loopback address unless ``--insecure`` says otherwise. The dashboard and
``/metrics`` (``master/web.py``, ``--web-port``) listen on the same host under the same rules and TLS.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

import grpc

from infra.master import web
from infra.master.auth import Authenticator, AuthInterceptor
from infra.master.config import Settings
from infra.master.controller import Controller
from infra.master.db import make_engine, migrate
from infra.master.service import ClientServicer, NodeServicer
from infra.master.wire import usage_row
from infra.protos import MAX_MESSAGE_BYTES, infra_pb2_grpc
from infra.protos.transport import is_loopback

log = logging.getLogger("infra.master")
# Calls that arrived but that the server has not taken up yet. gRPC's defaults (1,000, then random
# early drops up to 3,000) cancel part of the burst of registrations that follows a master restart,
# when every node registers at once; queued, each of those calls costs a little memory for a moment.
MAX_PENDING_CALLS = 100_000


class SettingsError(ValueError):
    pass


def check(settings: Settings) -> None:
    """Refuse combinations that would expose the master: no auth on a non-loopback address (unless
    ``--insecure``), half a TLS setting."""
    host = settings.bind.rsplit(":", 1)[0]
    if not settings.auth and not is_loopback(host) and not settings.insecure:
        raise SettingsError(
            f"refusing to listen on {settings.bind} without authentication: anyone who reaches it could run "
            "commands on every node. Use --auth (and TLS), or --insecure on a trusted network."
        )
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise SettingsError("TLS needs both --tls-cert and --tls-key")
    if settings.web_port is not None and not 0 <= settings.web_port <= 65535:
        raise SettingsError(f"--web-port must be 0 (any free port) to 65535, not {settings.web_port}")
    if not 0 < settings.artifact_max_bytes < 2**64:  # FetchArtifact.max_bytes is a uint64
        raise SettingsError(f"--artifact-max-bytes must be 1 byte to 16 EiB, not {settings.artifact_max_bytes}")
    if settings.tls_ca and not settings.tls_cert:
        raise SettingsError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    try:
        pair = (Path(settings.tls_key or "").read_bytes(), Path(settings.tls_cert).read_bytes())
        ca = Path(settings.tls_ca).read_bytes() if settings.tls_ca else None
    except OSError as e:
        raise SettingsError(f"cannot read a TLS file: {e.filename}: {e.strerror}") from None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


async def serve(settings: Settings) -> None:
    check(settings)
    creds = _server_credentials(settings)
    engine = make_engine(settings.db_url)
    await asyncio.get_running_loop().run_in_executor(None, migrate, engine)
    controller = Controller(engine, settings.controller(), usage_row=usage_row)
    await controller.start()
    authenticator = Authenticator(engine, controller.read) if settings.auth else None
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(authenticator)] if authenticator else None,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),  # notice dead node connections behind NAT
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ],
    )
    infra_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(controller), server)
    infra_pb2_grpc.add_ClientServiceServicer_to_server(ClientServicer(controller, authenticator), server)
    port = server.add_secure_port(settings.bind, creds) if creds else server.add_insecure_port(settings.bind)
    if port == 0:
        raise SystemExit(f"infra master: cannot listen on {settings.bind}")
    await server.start()
    host = settings.bind.rsplit(":", 1)[0]
    dashboard = None
    if settings.web_port is not None:
        tls = web.tls_context(settings.tls_cert, settings.tls_key or "", settings.tls_ca) if creds else None
        try:
            dashboard, web_port = await web.start(controller, authenticator, host.strip("[]"), settings.web_port, tls)
        except OSError as e:
            await server.stop(grace=0)
            await controller.stop()
            raise SettingsError(f"{e} (another --web-port, or --no-web)") from None
        scheme = "https" if tls else "http"
        print(f"infra master dashboard on {scheme}://{host}:{web_port}/ (Prometheus metrics at /metrics)", flush=True)
    # Everything loaded so far lives as long as the process: keep it out of the collector's scans, and
    # collect less often, so that a full collection over a large cluster never stalls calls.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    shown = engine.url.render_as_string(hide_password=True)
    security = ("auth" if settings.auth else "no auth") + (
        ", mutual TLS" if settings.tls_ca else ", TLS" if creds else ", plaintext"
    )
    lost = f"nodes lost after {controller.lost_timeout:g}s"
    print(f"infra master listening on {host}:{port} (database {shown}; {security}; {lost})", flush=True)
    if not settings.auth and not is_loopback(host):
        log.warning("listening on %s WITHOUT authentication (--insecure)", settings.bind)
    elif settings.auth and not creds and not is_loopback(host):
        log.warning("tokens travel in plaintext on %s: add --tls-cert/--tls-key", settings.bind)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    if dashboard is not None:
        await dashboard.cleanup()
    await server.stop(grace=2)
    await controller.stop()
    engine.dispose()


def main(settings: Settings) -> int:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(settings))
    except SettingsError as e:
        print(f"infra master: {e}", file=sys.stderr)
        return 2
    return 0
