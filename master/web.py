"""The master's web server: the dashboard, live logs as server-sent events, and Prometheus ``/metrics``.

It runs on the master's asyncio loop (aiohttp) beside the gRPC server, so pages read the same in-memory
state and the same database queries (``master/store.py``) as the gRPC ``ClientService``, and apply the
same rules: without ``--auth`` every visitor acts as the local admin (the server then binds loopback
only, as gRPC does); with ``--auth`` a visitor logs in with an ``infra token`` (kept in a server-side
session, the browser holds only a random session id), a user reads only their own experiments and an
admin reads all and may cancel. Files of a record download through the artifact relay
(``master/artifacts.py``), from the node that holds them, with byte ranges for resuming. ``/metrics`` takes
the session cookie or an ``Authorization: Bearer`` header (what Prometheus sends).

Pages are rendered here as HTML; the few scripts and the stylesheet are files of this package
(``master/static/``), nothing is fetched from elsewhere. A state-changing request is a POST that carries
the page's CSRF token (per session; per process without ``--auth``), and the session cookie is
``SameSite=Strict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from html import escape
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from infra.master import auth, store
from infra.master.artifacts import ArtifactError, record_path
from infra.master.auth import Authenticator, AuthError, Identity
from infra.master.controller import Controller
from infra.master.errors import NotFound
from infra.master.state import TERMINAL

log = logging.getLogger("infra.master")
STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "infra_session"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 10_000
EXPERIMENTS_SHOWN = 100
MAX_METRIC_ROWS = 200_000  # read for one stage's charts at most; then thinned to MAX_POINTS per series
MAX_POINTS = 1_500
KEEPALIVE_S = 15.0
IDENTITY = web.RequestKey("identity", Identity)
CSRF = web.RequestKey("csrf", str)
EXP_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RELAY_STATUS = {  # ArtifactError.kind -> HTTP status; the rest (failed) is 502: the node, not the request, failed
    "invalid": 400,
    "denied": 403,
    "not_found": 404,
    "too_large": 413,
    "offline": 503,
    "busy": 503,
}


@dataclass
class WebSession:
    token: str
    csrf: str
    expires: float


class Denied(Exception):
    """The visitor may not see this: 401 (log in) or 403 (another user's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Dashboard:
    def __init__(self, controller: Controller, authenticator: Authenticator | None, *, secure: bool = False) -> None:
        """``secure``: served over TLS, so the session cookie is marked Secure."""
        self.c = controller
        self.auth = authenticator
        self.secure = secure
        self.sessions: dict[str, WebSession] = {}
        self._local_csrf = secrets.token_urlsafe(32)  # without --auth there is no session, but forms still need one

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.add_routes(
            [
                web.get("/", self.cluster),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.get("/experiments", self.experiments),
                web.get("/experiments/{key}", self.experiment),
                web.post("/experiments/{key}/cancel", self.cancel),
                web.get("/experiments/{key}/stages/{stage}/logs", self.logs),
                web.get("/experiments/{key}/stages/{stage}/metrics.json", self.metrics_json),
                web.get("/experiments/{key}/files/{path:.+}", self.download),
                web.get("/metrics", self.prometheus),
                web.static("/static", STATIC),
            ]
        )
        return app

    # --- who is asking ----------------------------------------------------------------------------

    def _session(self, request: web.Request) -> tuple[str, WebSession] | None:
        sid = request.cookies.get(COOKIE, "")
        session = self.sessions.get(sid)
        if session is None or session.expires < time.time():
            self.sessions.pop(sid, None)
            return None
        return sid, session

    async def _identity(self, request: web.Request) -> tuple[Identity, str]:
        """(who, the CSRF token their forms carry); :class:`Denied` when they must log in."""
        if self.auth is None:
            return auth.LOCAL, self._local_csrf
        header = request.headers.get("Authorization")
        found = self._session(request)
        if header and request.path == "/metrics":
            token, csrf = header.partition(" ")[2].strip(), ""
        elif found is not None:
            token, csrf = found[1].token, found[1].csrf
        else:
            raise Denied(401, "log in with a token")
        try:  # every request: a token revoked since login stops working (the authenticator caches briefly)
            identity = await self.auth.identify([("authorization", f"Bearer {token}")])
        except AuthError as e:
            if found is not None:
                self.sessions.pop(found[0], None)
            raise Denied(401, str(e)) from None
        if identity.role == "node":
            raise Denied(403, "a node join token cannot read the dashboard")
        return identity, csrf

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and not _same_origin(request):
            response: web.StreamResponse = web.Response(status=403, text="cross-site request refused\n")
        elif request.path.startswith("/static/") or request.path == "/login":
            response = await handler(request)
        else:
            try:
                request[IDENTITY], request[CSRF] = await self._identity(request)
                if request.method == "POST":
                    await self._check_csrf(request)
                response = await handler(request)
            except Denied as e:
                response = self._denied(request, e)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    def _denied(self, request: web.Request, e: Denied) -> web.StreamResponse:
        wants_page = request.method == "GET" and "text/html" in request.headers.get("Accept", "")
        if e.status == 401 and wants_page:
            raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
        if e.status == 401 and request.path == "/metrics":
            return web.Response(status=401, text=str(e) + "\n", headers={"WWW-Authenticate": "Bearer"})
        return web.Response(status=e.status, text=str(e) + "\n")

    async def _check_csrf(self, request: web.Request) -> None:
        """The form's token must be this session's; a cross-site page can neither read nor guess it."""
        form = await request.post()
        sent = str(form.get("csrf", ""))
        if not request[CSRF] or not hmac.compare_digest(sent.encode(), request[CSRF].encode()):
            raise Denied(403, "the form's CSRF token is missing or stale: reload the page and try again")

    # --- login ------------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        return self._login_page(request.query.get("next", "/"), "")

    def _login_page(self, next_path: str, error: str, status: int = 200) -> web.Response:
        note = (
            "This master runs without authentication: every visitor acts as its admin."
            if self.auth is None
            else "Paste an <code>infra token</code> (<code>inf1.&lt;id&gt;.&lt;secret&gt;</code>)."
        )
        body = f"""<section class="login"><h1>infra</h1><p class="muted">{note}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{escape(next_path)}">
<input type="password" name="token" id="token" placeholder="token" autocomplete="current-password" autofocus>
<button type="submit">Log in</button></form>{f'<p class="error">{escape(error)}</p>' if error else ""}</section>"""
        return _html("Log in", body, None, "", status=status)

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        next_path = _local_path(str(form.get("next", "/")))
        if self.auth is None:
            raise web.HTTPSeeOther(next_path)
        token = str(form.get("token", "")).strip()
        try:
            identity = await self.auth.identify([("authorization", f"Bearer {token}")])
        except AuthError as e:
            return self._login_page(next_path, str(e), status=401)
        if identity.role == "node":
            return self._login_page(next_path, "a node join token cannot log in to the dashboard", status=403)
        now = time.time()
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions = {k: v for k, v in self.sessions.items() if v.expires > now}
        if len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))  # the oldest
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = WebSession(token, secrets.token_urlsafe(32), now + SESSION_TTL_S)
        response = web.HTTPSeeOther(next_path)
        response.set_cookie(
            COOKIE, sid, max_age=SESSION_TTL_S, httponly=True, samesite="Strict", secure=self.secure, path="/"
        )
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        found = self._session(request)
        if found is not None:
            self.sessions.pop(found[0], None)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE, path="/")
        raise response

    # --- pages ------------------------------------------------------------------------------------

    async def cluster(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        nodes = sorted(self.c.nodes.values(), key=lambda n: n.name)
        rows = []
        for n in nodes:
            state = self.c.node_state(n)
            gpus_html = _gpus(n.facts.get("gpus", []), getattr(n.usage, "gpus", ()), n.used_gpus)
            usage = n.usage
            mem_used = getattr(usage, "memory_used_mib", 0) if usage is not None else 0
            flags = []
            if n.drained:
                flags.append('<span class="badge st-drained">drained</span>')
            if n.unavailable:
                flags.append(f'<span class="badge st-failed" title="{escape(n.unavailable)}">unavailable</span>')
            rows.append(
                f"""<tr data-node="{escape(n.name)}"><td><b>{escape(n.name)}</b>
<div class="muted small">{escape(str(n.facts.get("hostname", "")))}</div></td>
<td>{_badge(state)} {" ".join(flags)}</td>
<td>{gpus_html}</td>
<td class="num">{n.used_cpus:g} / {n.cpus:g}</td>
<td class="num">{_mib(n.used_memory_mib)} / {_mib(n.memory_mib)}
<div class="muted small">host {_mib(mem_used)} in use</div></td>
<td class="num">{len(n.attempts)}</td>
<td>{_ago(n.last_heartbeat, now)}</td></tr>"""
            )
        gpu_total = sum(len(n.gpus) for n in nodes)
        gpu_used = sum(len(n.used_gpus) for n in nodes)
        online = sum(self.c.node_state(n) == "online" for n in nodes)
        stages = [st for e in self.c.experiments.values() for st in e.stages]
        cards = _cards(
            [
                ("nodes online", f"{online} / {len(nodes)}"),
                ("GPUs allocated", f"{gpu_used} / {gpu_total}"),
                ("stages running", str(sum(st.state == "running" for st in stages))),
                ("stages waiting", str(sum(st.state == "ready" for st in stages))),
                ("experiments unfinished", str(len(self.c.experiments))),
            ]
        )
        table = (
            '<table class="grid" id="nodes"><thead><tr><th>node</th><th>state</th><th>GPUs (utilisation, memory)</th>'
            "<th>CPUs alloc.</th><th>memory alloc.</th><th>attempts</th><th>last heard</th></tr></thead><tbody>"
            + ("".join(rows) or '<tr><td colspan="7" class="muted">no node has registered yet</td></tr>')
            + "</tbody></table>"
        )
        body = f'<h1>Cluster</h1><div id="summary" data-live>{cards}{table}</div>'
        return _html("Cluster", body, request[IDENTITY], request[CSRF], refresh=5)

    async def experiments(self, request: web.Request) -> web.StreamResponse:
        me: Identity = request[IDENTITY]
        state = request.query.get("state", "")
        owner = request.query.get("owner", "")
        if state and state not in EXP_STATES:
            raise web.HTTPBadRequest(text=f"state: {state!r} is not one of {', '.join(EXP_STATES)}")
        if not me.admin:
            owner = me.user  # a user lists their own experiments, as `infra status` does
        exps = await self.c.read(store.status, self.c.engine, None, EXPERIMENTS_SHOWN, owner or None, state or None)
        now = time.time()
        rows = []
        for e in exps:
            counts: dict[str, int] = {}
            for st in e["stages"]:
                counts[st["state"]] = counts.get(st["state"], 0) + 1
            chips = " ".join(f'<span class="chip st-{s}" title="{s}">{n} {s}</span>' for s, n in sorted(counts.items()))
            rows.append(
                f"""<tr><td><a href="/experiments/{quote(e["key"])}">{escape(e["key"])}</a></td>
<td>{escape(e["owner"] or "")}</td><td>{_badge(e["state"])}</td><td>{chips}</td><td class="num">{e["priority"]}</td>
<td>{_ago(e["created_at"], now)}</td><td>{_ago(e["finished_at"], now) if e["finished_at"] else ""}</td></tr>"""
            )
        options = "".join(
            f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>' for s in ("", *EXP_STATES)
        )
        owner_field = (
            f'<label>owner <input name="owner" value="{escape(owner)}" size="12"></label>'
            if me.admin
            else f'<span class="muted">yours ({escape(me.user)})</span>'
        )
        filters = f"""<form class="filters" method="get" action="/experiments"><label>state
<select name="state">{options}</select></label> {owner_field} <button type="submit">Filter</button></form>"""
        table = (
            '<table class="grid" id="experiments"><thead><tr><th>experiment</th><th>owner</th><th>state</th>'
            "<th>stages</th><th>priority</th><th>submitted</th><th>finished</th></tr></thead><tbody>"
            + ("".join(rows) or '<tr><td colspan="7" class="muted">no experiment matches</td></tr>')
            + "</tbody></table>"
        )
        shown = f'<p class="muted small">the newest {EXPERIMENTS_SHOWN} that match</p>'
        body = f'<h1>Experiments</h1>{filters}<div id="listing" data-live>{table}{shown}</div>'
        return _html("Experiments", body, me, request[CSRF], refresh=10)

    async def _may_read(self, request: web.Request, key: str) -> None:
        """The gRPC side's rule: a user reads their own experiments only."""
        exists, owner = await self.c.read(store.experiment_owner, self.c.engine, key)
        if not exists:
            raise web.HTTPNotFound(text=f"no experiment {key!r}")
        me: Identity = request[IDENTITY]
        if not me.admin and owner != me.user:
            raise Denied(
                403, f"experiment {key!r} belongs to {owner or 'nobody'!r}; user {me.user!r} may only access their own"
            )

    async def experiment(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        await self._may_read(request, key)
        exps = await self.c.read(store.status, self.c.engine, key, 1)
        if not exps:
            raise web.HTTPNotFound(text=f"no experiment {key!r}")
        e = exps[0]
        artifacts = await self.c.read(store.artifacts, self.c.engine, key)
        me: Identity = request[IDENTITY]
        now = time.time()
        base = f"/experiments/{quote(key)}"
        cancel = ""
        if me.admin and e["state"] not in TERMINAL:
            cancel = f"""<form method="post" action="{base}/cancel" class="inline" id="cancel-form">
<input type="hidden" name="csrf" value="{escape(request[CSRF])}">
<button type="submit" class="danger" id="cancel">Cancel experiment</button></form>"""
        facts = _cards(
            [
                ("state", _badge(e["state"])),
                ("owner", escape(e["owner"] or "-")),
                ("priority", str(e["priority"])),
                ("submitted", _ago(e["created_at"], now)),
                ("finished", _ago(e["finished_at"], now) if e["finished_at"] else "-"),
            ],
            raw=True,
        )
        stage_rows = "".join(_stage_row(st, now) for st in e["stages"])
        stages = (
            '<table class="grid" id="stages"><thead><tr><th>stage</th><th>kind</th><th>after</th><th>state</th>'
            "<th>resources</th><th>attempts</th><th>why</th></tr></thead><tbody>" + stage_rows + "</tbody></table>"
        )
        names = [st["name"] for st in e["stages"]]
        # A gang's members write their own logs: one tab each (the CLI's --member).
        sizes = {st["name"]: await self.c.read(store.gang_size, self.c.engine, st["id"]) for st in e["stages"]}
        tabs = "".join(
            f'<button type="button" class="tab" data-stage="{escape(n)}" '
            f'data-src="{base}/stages/{quote(n)}/logs{f"?member={r}" if sizes[n] > 1 else ""}">'
            f"{escape(n)}{f' · member {r}' if sizes[n] > 1 else ''}</button>"
            for n in names
            for r in range(sizes[n])
        )
        charts = "".join(
            f'<div class="stage-charts" data-stage="{escape(n)}" '
            f'data-src="{base}/stages/{quote(n)}/metrics.json"></div>'
            for n in names
        )
        art_rows = "".join(_artifact_row(key, r, n, now) for r, n in _latest(artifacts))
        art = (
            '<table class="grid" id="artifacts"><thead><tr><th>stage</th><th>attempt</th><th>kind</th><th>path</th>'
            "<th>node</th><th>reported</th></tr></thead><tbody>"
            + (art_rows or '<tr><td colspan="6" class="muted">no artifact reported yet</td></tr>')
            + "</tbody></table>"
        )
        live = "true" if e["state"] not in TERMINAL else "false"
        body = f"""<div id="head" data-live><div class="title-row"><h1>{escape(key)}</h1>{cancel}</div>{facts}
<h2>Stages</h2>{_graph(e["stages"])}{stages}</div>
<h2>Metrics</h2><div id="charts" data-running="{live}">{charts}
<p class="muted small" id="no-metrics">no metric reported yet</p></div>
<h2>Logs</h2><div class="tabs" id="log-tabs">{tabs}</div><pre id="log" class="log" aria-live="polite"></pre>
<h2>Artifacts</h2><div id="artifact-list" data-live>{art}</div>"""
        refresh = 5 if e["state"] not in TERMINAL else 0
        return _html(key, body, me, request[CSRF], refresh=refresh, scripts=("chart.js", "experiment.js"))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        me: Identity = request[IDENTITY]
        await self._may_read(request, key)
        if not me.admin:
            raise Denied(403, "cancelling from the dashboard needs an admin token")
        try:
            await self.c.cancel(key, f"cancelled from the dashboard by {me.user or 'the local admin'}")
        except NotFound as e:
            raise web.HTTPNotFound(text=str(e)) from None
        raise web.HTTPSeeOther(f"/experiments/{quote(key)}")

    # --- data for the page's scripts ----------------------------------------------------------------

    async def _stage(self, request: web.Request) -> dict[str, Any]:
        key, name = request.match_info["key"], request.match_info["stage"]
        await self._may_read(request, key)
        row = await self.c.read(store.find_stage, self.c.engine, key, name, 0)
        if row is None:
            raise web.HTTPNotFound(text=f"no stage {key}/{name}")
        return row  # type: ignore[no-any-return]

    async def _member(self, request: web.Request, stage: dict[str, Any]) -> int:
        """The ``member`` query parameter: which member of a gang (0 to K - 1) the request reads; 0 otherwise."""
        raw = request.query.get("member", "0")
        if not raw.isdigit():
            raise web.HTTPBadRequest(text=f"member: {raw!r} is not a member number (0, 1, ...)")
        member = int(raw)
        size = await self.c.read(store.gang_size, self.c.engine, stage["id"]) if member else 1
        if member >= size:
            raise web.HTTPBadRequest(
                text=f"member: stage {stage['name']} has {size} member(s) (0 to {size - 1}); "
                f"there is no member {member}"
            )
        return member

    async def logs(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: every log line of the stage's latest attempt, then each new one as it is stored;
        a retry starts over with its attempt. ``Last-Event-ID`` (``attempt:seq``) resumes after a reconnect;
        ``?member=R`` follows member R of a gang (each member has its own lines)."""
        stage = await self._stage(request)
        member = await self._member(request, stage)
        attempt, after = _cursor(request.headers.get("Last-Event-ID", ""))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        idle = 0.0
        while True:
            latest = await self.c.read(store.latest_attempt, self.c.engine, stage["id"])
            if latest != attempt:
                attempt, after = latest, 0
                await response.write(_sse("attempt", str(attempt)))
            state = await self.c.read(store.stage_state, self.c.engine, stage["id"])
            sent = 0
            while attempt:
                rows = await self.c.read(
                    store.events,
                    self.c.engine,
                    stage["id"],
                    ("log", "dropped"),
                    attempt,
                    after,
                    store.PAGE_SIZE,
                    0,
                    member,
                )
                for r in rows:
                    after = r["seq"]
                    line = {"stream": r["data"].get("stream", "agent"), "text": _log_text(r), "time": r["time"]}
                    await response.write(_sse("line", json.dumps(line), f"{attempt}:{after}"))
                sent += len(rows)
                if len(rows) < store.PAGE_SIZE:
                    break
            if state in TERMINAL and not sent:
                await response.write(_sse("end", state))
                return response
            if not sent:
                started = time.monotonic()
                await self.c.wait_for_events(KEEPALIVE_S)
                idle += time.monotonic() - started
                if idle >= KEEPALIVE_S:  # a comment keeps proxies from closing a quiet stream
                    await response.write(b": keep-alive\n\n")
                    idle = 0.0

    async def metrics_json(self, request: web.Request) -> web.StreamResponse:
        """A stage's metric series, ``{name: [[step, value], ...]}``, thinned to :data:`MAX_POINTS` per series
        for drawing: the latest attempt's under the metric's name, an earlier attempt's as ``attempt N: name``
        (a retry that resumes from a checkpoint repeats steps, which one line would draw as a zigzag)."""
        stage = await self._stage(request)
        series: dict[tuple[int, str], list[tuple[float, float]]] = {}
        cursor = (0, 0)
        read = 0
        while read < MAX_METRIC_ROWS:
            rows = await self.c.read(
                store.events, self.c.engine, stage["id"], ("metric",), None, cursor[1], store.PAGE_SIZE, cursor[0]
            )
            for r in rows:
                step = r["data"].get("step", 0)
                for name, value in (r["data"].get("values") or {}).items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        series.setdefault((r["attempt"], name), []).append((step, value))
            read += len(rows)
            if len(rows) < store.PAGE_SIZE:
                break
            cursor = (rows[-1]["attempt"], rows[-1]["seq"])
        return web.json_response({"stage": stage["name"], "state": stage["state"], "series": _by_attempt(series)})

    async def download(self, request: web.Request) -> web.StreamResponse:
        """A file of the record, relayed from the node that holds it (``master/artifacts.py``) as it arrives.
        One ``Range`` (``bytes=N-``, ``bytes=N-M`` or ``bytes=-N``) gives 206 from that offset, so a browser or
        ``curl -C -`` resumes."""
        key, path = request.match_info["key"], request.match_info["path"]
        await self._may_read(request, key)
        me: Identity = request[IDENTITY]
        relay = self.c.artifacts
        try:
            size = await relay.stat(key, path, user=me)
        except ArtifactError as e:
            return _relay_error(e)
        header = request.headers.get("Range")
        span = _range(header, size) if header else (0, size)
        if span is None:
            return web.Response(
                status=416,
                text=f"Range {header!r} is not one byte range within the file's {size} bytes\n",
                headers={"Content-Range": f"bytes */{size}"},
            )
        start, end = span
        name = PurePosixPath(record_path(key, path)).name
        response = web.StreamResponse(
            status=206 if header else 200,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": _attachment(name),
                "Accept-Ranges": "bytes",
                "Cache-Control": "no-store",
                "Content-Security-Policy": CSP,  # set before the headers go (the guard's come too late here)
                "X-Content-Type-Options": "nosniff",
            },
        )
        response.content_length = end - start
        if header:
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        left = end - start
        if request.method == "HEAD" or left == 0:
            await response.prepare(request)
            return response
        chunks = relay.stream(key, path, start, user=me)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if not response.prepared:
                        await response.prepare(request)  # after the node's first answer: its refusal is a status
                    await response.write(chunk[:left])
                    left -= min(left, len(chunk))
                    if not left:
                        break  # the end of the range: closing the stream ends the node's upload
        except ArtifactError as e:
            if not response.prepared:
                return _relay_error(e)
            log.warning("download of %s/%s broke off: %s", key, path, e)
            response.force_close()  # fewer bytes than Content-Length, then no more: the client sees it is cut
            return response
        except ConnectionResetError:  # the client went away; leaving the stream above ended the node's upload
            return response
        if left:  # the file shrank since its size was read: end the connection short rather than pad it
            log.warning("download of %s/%s ended %d bytes early", key, path, left)
            response.force_close()
        return response

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        snap = self.c.metrics.snapshot()  # on the loop; the rest, most of the work, in a thread
        body = await asyncio.get_running_loop().run_in_executor(None, self.c.metrics.render, snap)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start(
    controller: Controller,
    authenticator: Authenticator | None,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve the dashboard on the running loop; returns the runner (``cleanup()`` stops it) and the port."""
    dashboard = Dashboard(controller, authenticator, secure=tls is not None).app()
    runner = web.AppRunner(dashboard, access_log=None, shutdown_timeout=1.0)  # open log streams end at stop
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"the dashboard cannot listen on {host}:{port}: {e.strerror}") from None
    return runner, int(runner.addresses[0][1])


# --- HTML pieces ------------------------------------------------------------------------------------


def _html(
    title: str,
    body: str,
    me: Identity | None,
    csrf: str,
    *,
    status: int = 200,
    refresh: int = 0,
    scripts: tuple[str, ...] = (),
) -> web.Response:
    nav = ""
    if me is not None:
        who = escape(me.user) if me.user else "local admin"
        logout = (
            f"""<form method="post" action="/logout" class="inline">
<input type="hidden" name="csrf" value="{escape(csrf)}">
<button type="submit" class="link">log out</button></form>"""
            if me.user
            else ""
        )
        nav = f"""<nav><a class="brand" href="/">infra</a><a href="/">Cluster</a><a href="/experiments">Experiments</a>
<span class="spacer"></span><span class="who">{who} <span class="badge">{escape(me.role)}</span></span>{logout}</nav>"""
    tags = "".join(f'<script src="/static/{s}" defer></script>' for s in ("app.js", *scripts))
    meta = f'<meta name="infra-refresh" content="{refresh}">' if refresh else ""
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} · infra</title>
<meta name="viewport" content="width=device-width, initial-scale=1">{meta}
<link rel="stylesheet" href="/static/style.css">{tags}</head><body>{nav}<main>{body}</main></body></html>"""
    return web.Response(text=page, content_type="text/html", status=status, headers={"Cache-Control": "no-store"})


def _badge(state: str) -> str:
    return f'<span class="badge st-{escape(state)}">{escape(state)}</span>'


def _cards(items: list[tuple[str, str]], raw: bool = False) -> str:
    cells = "".join(
        f'<div class="card"><div class="muted small">{escape(k)}</div>'
        f'<div class="big">{v if raw else escape(v)}</div></div>'
        for k, v in items
    )
    return f'<div class="cards">{cells}</div>'


def _ago(t: float | None, now: float) -> str:
    """A relative time the page's script keeps current (the absolute time in its tooltip)."""
    if not t:
        return '<span class="muted">never</span>'
    s = max(0.0, now - t)
    text = (
        f"{s:.0f} s ago"
        if s < 90
        else f"{s / 60:.0f} min ago"
        if s < 5400
        else f"{s / 3600:.0f} h ago"
        if s < 129600
        else f"{s / 86400:.0f} d ago"
    )
    iso = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    return f'<time data-t="{t:.3f}" title="{iso}">{text}</time>'


def _mib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def _gpus(facts: list[dict[str, Any]], usage: Any, allocated: set[int]) -> str:
    """One line per GPU: index, model, utilisation and memory from the last heartbeat, allocation."""
    live = {g.index: g for g in usage}
    out = []
    for f in facts:
        i = int(f.get("index", 0))
        g = live.get(i)
        util = g.utilization_percent if g is not None else None
        bar = (
            f'<span class="bar" title="{util:.0f} % utilisation">'
            f'<span style="width:{min(100.0, util):.0f}%"></span></span>'
            f'<span class="num">{util:.0f} %</span>'
            if util is not None
            else '<span class="muted small">no usage reported</span>'
        )
        mem = (
            f'<span class="muted small">{_mib(g.memory_used_mib)} / {_mib(g.memory_total_mib)}</span>'
            if g is not None and g.memory_total_mib
            else ""
        )
        held = '<span class="chip st-running">allocated</span>' if i in allocated else '<span class="chip">free</span>'
        name = escape(str(f.get("name", "GPU")))
        out.append(f'<div class="gpu"><b>{i}</b> <span class="small">{name}</span> {bar} {mem} {held}</div>')
    return "".join(out) or '<span class="muted">none</span>'


def _by_attempt(series: dict[tuple[int, str], list[tuple[float, float]]]) -> dict[str, list[tuple[float, float]]]:
    """Thinned series named for drawing: the latest attempt's by the metric's name, earlier ones' as
    ``attempt N: name`` (so a name ending in ``loss`` still shares the loss chart)."""
    latest = max((attempt for attempt, _ in series), default=0)
    named = {
        (name if attempt == latest else f"attempt {attempt}: {name}"): pts for (attempt, name), pts in series.items()
    }
    return {name: _thin(points) for name, points in sorted(named.items())}


def _stage_row(st: dict[str, Any], now: float) -> str:
    attempts = "".join(
        f'<div class="attempt">#{a["number"]} {_badge(a["state"])} on {escape(a["node_name"])}'
        + (f' <span class="muted">GPU {",".join(map(str, a["gpu_indices"]))}</span>' if a["gpu_indices"] else "")
        + (f' <span class="muted">exit {a["exit_code"]}</span>' if a["exit_code"] else "")
        + (f' <span class="chip st-failed">{escape(a["failure_class"])}</span>' if a.get("failure_class") else "")
        + (f' <span class="muted small">{escape(a["message"])}</span>' if a["message"] else "")
        + "</div>"
        for a in st["attempt_rows"]
    )
    resources = f"{st['gpus']} GPU · {st['cpus']:g} CPU · {_mib(st['memory_mib'])}"
    after = ", ".join(escape(a) for a in st["after"]) or '<span class="muted">-</span>'
    return f"""<tr data-stage="{escape(st["name"])}"><td><b>{escape(st["name"])}</b></td><td>{escape(st["kind"])}</td>
<td>{after}</td><td>{_badge(st["state"])}</td><td class="small">{resources}</td>
<td>{attempts or '<span class="muted">-</span>'}</td>
<td class="small reason">{escape(st["reason"])}<div class="muted">{_ago(st["updated_at"], now)}</div></td></tr>"""


GRAPH_FILL = {
    "succeeded": ("#dcf3e3", "#17643a"),
    "running": ("#dbe8ff", "#1b4fae"),
    "assigned": ("#dbe8ff", "#1b4fae"),
    "ready": ("#fdf1d6", "#8a5a00"),
    "pending": ("#fdf1d6", "#8a5a00"),
    "failed": ("#fde0de", "#a02018"),
    "cancelled": ("#eceff4", "#596273"),
}


def _graph(stages: list[dict[str, Any]]) -> str:
    """The stages as a left-to-right graph: a stage's column is its longest chain of dependencies, so every
    arrow points right; boxes take their state's colour. Plain SVG in the page (no script)."""
    if len(stages) < 2:
        return ""
    after = {st["name"]: st["after"] for st in stages}
    depth: dict[str, int] = {}
    for name in after:  # depth-first without recursion (a chain may be 1,000 stages long; plans have no cycles)
        todo = [name]
        while todo:
            top = todo[-1]
            missing = [a for a in after[top] if a not in depth]
            if missing:
                todo.extend(missing)
                continue
            depth[top] = 1 + max((depth[a] for a in after[top]), default=-1)
            todo.pop()
    rows: dict[int, int] = {}
    at: dict[str, tuple[int, int]] = {}
    for st in stages:
        col = depth[st["name"]]
        at[st["name"]] = (16 + col * 170, 10 + rows.get(col, 0) * 44)
        rows[col] = rows.get(col, 0) + 1
    w, h = 16 + (max(depth.values()) + 1) * 170, 10 + max(rows.values()) * 44
    parts = [f'<svg class="graph" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="stage graph">']
    for st in stages:
        x, y = at[st["name"]]
        for dep in st["after"]:
            dx, dy = at[dep]
            parts.append(
                f'<path d="M{dx + 140},{dy + 15} C{dx + 155},{dy + 15} {x - 15},{y + 15} {x},{y + 15}" '
                'fill="none" stroke="#9aa3b2" stroke-width="1.2"/>'
            )
    for st in stages:
        x, y = at[st["name"]]
        fill, ink = GRAPH_FILL.get(st["state"], ("#eceff4", "#3b4452"))
        name = escape(st["name"] if len(st["name"]) <= 18 else st["name"][:17] + "…")
        parts.append(
            f'<g data-stage="{escape(st["name"])}"><title>{escape(st["name"])}: {escape(st["state"])}</title>'
            f'<rect x="{x}" y="{y}" width="140" height="30" rx="5" fill="{fill}" stroke="{ink}" stroke-opacity=".35"/>'
            f'<text x="{x + 10}" y="{y + 19}" fill="{ink}">{name}</text></g>'
        )
    return "".join(parts) + "</svg>"


def _latest(artifacts: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    """Each artifact once, as last reported, with how often (a checkpoint is reported at every save)."""
    latest: dict[tuple[str, int, str], dict[str, Any]] = {}
    counts: dict[tuple[str, int, str], int] = {}
    for r in artifacts:
        key = (r["stage"], r["attempt"], r["data"].get("path", ""))
        latest[key] = r
        counts[key] = counts.get(key, 0) + 1
    return [(r, counts[key]) for key, r in latest.items()]


def _artifact_row(key: str, r: dict[str, Any], times: int, now: float) -> str:
    """One reported artifact; its path links to the file, relayed from its node (a reported folder's link
    answers 404: the node sends files only)."""
    reported = r["data"].get("path", "")
    prefix = f"experiments/{key}/"
    rel = reported[len(prefix) :] if reported.startswith(prefix) else reported
    path = f"<code>{escape(reported)}</code>"
    if rel:
        href = f"/experiments/{quote(key)}/files/{quote(rel)}"
        path = f'<a class="download" href="{escape(href)}" download>{path}</a>'
    again = f' <span class="muted small">×{times}</span>' if times > 1 else ""
    kind = escape(r["data"].get("kind", ""))
    return f"""<tr><td>{escape(r["stage"])}</td><td class="num">{r["attempt"]}</td><td>{kind}</td>
<td>{path}</td><td>{escape(r["node_name"])}</td><td>{_ago(r["time"], now)}{again}</td></tr>"""


def _relay_error(e: ArtifactError) -> web.Response:
    return web.Response(status=RELAY_STATUS.get(e.kind, 502), text=f"{e}\n")


def _range(header: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of one ``bytes=`` range of a file of ``size`` bytes; None for anything else (several
    ranges, another unit, a start at or past the end)."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or not dash or not (first.isdigit() or last.isdigit()):
        return None
    if (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:  # the last N bytes
        return (max(0, size - int(last)), size) if int(last) > 0 and size else None
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    return (start, end) if start < size and start < end else None


def _attachment(name: str) -> str:
    """A ``Content-Disposition`` that saves as the file's own name: an ASCII fallback with nothing a header or
    a file system could misread (quotes, separators, control characters), and the exact name UTF-8-encoded."""
    plain = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".") or "artifact"
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a POST comes from; one from another site is refused (login included)."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc == request.host


def _local_path(path: str) -> str:
    """Where to go after login: a path on this server only (never ``//host`` or a full URL)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def _cursor(value: str) -> tuple[int, int]:
    attempt, _, seq = value.partition(":")
    return (int(attempt), int(seq)) if attempt.isdigit() and seq.isdigit() else (0, 0)


def _sse(event: str, data: str, event_id: str = "") -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def _log_text(row: dict[str, Any]) -> str:
    d = row["data"]
    if row["type"] != "dropped":
        return str(d.get("text", ""))
    return f"{d.get('count', 0)} events dropped: " + (d.get("reason") or "the node's event spool was full")


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most :data:`MAX_POINTS`, evenly strided, the last point kept (a chart needs no more)."""
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    out = points[::stride]
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def tls_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """The gRPC server's certificate for HTTPS; with its CA, client certificates are required here too."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
