"""Access tokens and the server interceptor that checks them on every call.

A token is ``inf1.<id>.<secret>`` where the secret is 32 random bytes (URL-safe base64). The database
keeps only ``sha256(secret)``; a presented token is looked up by its id and its secret's hash compared in
constant time, so a token can be neither read back from the database nor guessed by timing. Tokens are
never logged (only their id).

Roles: ``node`` (a cluster join token: the NodeService only), ``user`` (the ClientService, own
experiments only), ``admin`` (every experiment, and token management). Without ``--auth`` the master
runs no interceptor and every caller acts as a local admin.
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from infra.master.models import Token

PREFIX = "inf1"
ROLES = ("user", "admin", "node")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
POSITIVE_TTL_S = 30.0  # a token revoked directly in the database stops working within this time
NEGATIVE_TTL_S = 5.0  # unknown ids are not looked up again for this long (a flood of bad tokens is cheap)
NODE_SERVICE = "infra.v1.NodeService"
ADMIN_METHODS = frozenset({"CreateToken", "ListTokens", "RevokeToken", "DrainNode"})


@dataclass(frozen=True)
class Identity:
    user: str
    role: str
    token_id: int = 0

    @property
    def admin(self) -> bool:
        return self.role == "admin"


LOCAL = Identity("", "admin")  # every caller when authentication is off
CURRENT: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("infra_identity", default=None)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_new_token(user: str, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not USER_RE.match(user):
        raise ValueError(f"user {user!r} is not a valid name (1-64 of letters, digits, '_', '.', '@', '-')")


def create_token(s: Session, user: str, role: str) -> tuple[str, dict[str, Any]]:
    """Insert a token; returns the token text (shown once) and its row."""
    check_new_token(user, role)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    row = {"user": user, "role": role, "secret_sha256": _digest(secret), "created_at": time.time(), "revoked_at": None}
    token_id = s.execute(insert(Token).returning(Token.id), [row]).scalar_one()
    return f"{PREFIX}.{token_id}.{secret}", {**row, "id": token_id}


def list_tokens(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as s:
        rows = s.execute(
            select(Token.id, Token.user, Token.role, Token.created_at, Token.revoked_at).order_by(Token.id)
        )
        return [dict(r._mapping) for r in rows]


def revoke_token(s: Session, token_id: int) -> bool:
    stmt = update(Token).where(Token.id == token_id, Token.revoked_at.is_(None)).values(revoked_at=time.time())
    return s.execute(stmt).rowcount == 1


def _lookup(engine: Engine, token_id: int) -> tuple[str, str, str, bool] | None:
    with Session(engine) as s:
        row = s.execute(
            select(Token.secret_sha256, Token.user, Token.role, Token.revoked_at).where(Token.id == token_id)
        ).first()
    return None if row is None else (row[0], row[1], row[2], row[3] is not None)


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Authenticator:
    """Resolves bearer tokens to identities, caching rows (not secrets) for a short while."""

    def __init__(self, engine: Engine, read: Callable[..., Awaitable[Any]]) -> None:
        self.engine = engine
        self._read = read
        self._cache: dict[int, tuple[float, tuple[str, str, str, bool] | None]] = {}

    def forget(self, token_id: int) -> None:
        self._cache.pop(token_id, None)

    async def identify(self, metadata: Any) -> Identity:
        header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if not header:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "this master requires a token: set INFRA_TOKEN or --token-file (users), INFRA_JOIN_TOKEN or "
                "--join-token-file (nodes); an admin creates one with `infra token create`",
            )
        scheme, _, token = str(header).partition(" ")
        parts = token.strip().split(".")
        if scheme.lower() != "bearer" or len(parts) != 3 or parts[0] != PREFIX or not parts[1].isdigit():
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "malformed token (expected 'Bearer inf1.<id>.<secret>')")
        token_id = int(parts[1])
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached is None or now - cached[0] > (POSITIVE_TTL_S if cached[1] else NEGATIVE_TTL_S):
            if len(self._cache) > 10_000:
                self._cache.clear()
            cached = (now, await self._read(_lookup, self.engine, token_id))
            self._cache[token_id] = cached
        row = cached[1]
        if row is None or not hmac.compare_digest(row[0], _digest(parts[2])):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"invalid token (id {token_id})")
        if row[3]:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"token {token_id} was revoked")
        return Identity(row[1], row[2], token_id)


def authorize(identity: Identity, method: str) -> None:
    """Nodes call the NodeService only; users and admins the ClientService; token management is admin's."""
    service, _, name = method.lstrip("/").partition("/")
    if service == NODE_SERVICE:
        if identity.role != "node":
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"{name} is a node call: it needs a cluster join token")
        return
    if identity.role == "node":
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"a node join token may only call node RPCs, not {name}")
    if name in ADMIN_METHODS and not identity.admin:
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"{name} needs an admin token (user {identity.user!r})")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorizes every call before its handler runs; the identity is then available
    to the handler through :data:`CURRENT` (set in the handler's own task)."""

    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth
        self._wrapped: dict[str, Any] = {}  # per method: wrapping once keeps calls cheap

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:
                return None
            wrapped = self._wrapped[details.method] = self._wrap(handler, details.method)
        return wrapped

    def _wrap(self, handler: Any, method: str) -> Any:
        check = self._check
        ser = (handler.request_deserializer, handler.response_serializer)

        def awaited(inner: Any) -> Any:
            """A call whose handler returns once (unary replies, and the streams the handler reads and
            writes on the call: UploadArtifact, HeartbeatStream)."""

            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = CURRENT.set(await check(context, method))
                try:
                    return await inner(request, context)
                finally:
                    CURRENT.reset(token)

            return call

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(awaited(handler.unary_unary), *ser)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                CURRENT.set(await check(context, method))
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, *ser)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(awaited(handler.stream_unary), *ser)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(awaited(handler.stream_stream), *ser)
        raise AssertionError(f"{method}: a call of no known shape would go unchecked")

    async def _check(self, context: grpc.aio.ServicerContext, method: str) -> Identity:
        try:
            identity = await self.auth.identify(context.invocation_metadata())
            authorize(identity, method)
        except AuthError as e:
            await context.abort(e.code, str(e))
        return identity


def current(auth_enabled: bool) -> Identity:
    """The caller of the running handler."""
    identity = CURRENT.get()
    if identity is not None:
        return identity
    if auth_enabled:  # unreachable through the interceptor; refuse rather than default to admin
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "no identity for this call")
    return LOCAL
