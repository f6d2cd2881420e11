"""How node agents and clients reach the master: TLS (optionally mutual), the token, message limits.

Both sides set the maximum message size explicitly (``protos.MAX_MESSAGE_BYTES``). The token travels in
call metadata as ``authorization: Bearer <token>`` on every call. Settings come from command-line
flags, else the environment:

- ``INFRA_TOKEN`` / ``--token-file``: a user's token (clients); ``INFRA_JOIN_TOKEN`` /
  ``--join-token-file``: the cluster join token (nodes); a client also reads ``<config dir>/token``.
- ``INFRA_TLS_CA``: the CA that signed the master's certificate (turns TLS on);
  ``INFRA_TLS_CERT`` + ``INFRA_TLS_KEY``: this side's certificate for mutual TLS.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from infra.protos import MAX_MESSAGE_BYTES

KEEPALIVE = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# A node must get through again well within the master's lost timeout (default 60 s) once the network is
# back: gRPC's own reconnect backoff (1 s growing to 120 s) would let a flaky minute turn into a lost node.
RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
LIMITS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class TransportError(RuntimeError):
    """A TLS or token setting that cannot be used (a missing file, a cert without its key)."""


@dataclass(frozen=True)
class ClientTls:
    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @staticmethod
    def from_settings(ca: str | None, cert: str | None, key: str | None) -> ClientTls | None:
        """The TLS setting from flags, else ``INFRA_TLS_*``; None (plaintext) without a CA."""
        ca = ca or os.environ.get("INFRA_TLS_CA")
        cert = cert or os.environ.get("INFRA_TLS_CERT")
        key = key or os.environ.get("INFRA_TLS_KEY")
        if not ca:
            if cert or key:
                raise TransportError("--tls-cert/--tls-key need --tls-ca (the CA that signed the master's certificate)")
            return None
        if bool(cert) != bool(key):
            raise TransportError("mutual TLS needs both --tls-cert and --tls-key")
        return ClientTls(Path(ca), Path(cert) if cert else None, Path(key) if key else None)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--tls-ca"),
            private_key=_read(self.key, "--tls-key") if self.key else None,
            certificate_chain=_read(self.cert, "--tls-cert") if self.cert else None,
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TransportError(f"{what} {path}: {e.strerror or e}") from None


def read_token(file: str | None, env: str, default_file: Path | None = None) -> str | None:
    """A token from ``file``, else ``$env``, else ``default_file`` if it exists; None when there is none."""
    if file:
        text = _read(Path(file), "token file").decode().strip()
        if not text:
            raise TransportError(f"token file {file} is empty")
        return text
    if os.environ.get(env):
        return os.environ[env].strip()
    if default_file is not None and default_file.is_file():
        return default_file.read_text(encoding="utf-8").strip() or None
    return None


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    pass


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call the protocol has (a node's upload streams its
    requests; its heartbeats go both ways on one stream)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(d.metadata or ()), self._header]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


class Connection:
    """A channel to the master with the token attached; ``close()`` closes the underlying channel."""

    def __init__(
        self, address: str, token: str | None = None, tls: ClientTls | None = None, options: list[Any] | None = None
    ) -> None:
        opts = [*LIMITS, *(options or [])]
        self.raw = (
            grpc.secure_channel(address, tls.credentials(), opts) if tls else grpc.insecure_channel(address, opts)
        )
        self.channel: grpc.Channel = grpc.intercept_channel(self.raw, _Bearer(token)) if token else self.raw

    def close(self) -> None:
        self.raw.close()


def is_loopback(host: str) -> bool:
    """Whether a bind host is reachable from this machine only."""
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
