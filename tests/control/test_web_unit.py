"""The dashboard's handlers on a controller driven in-process (real SQLite, real HTTP on loopback, no browser):
filters, metric series, the log stream's resume and end, CSRF, GPU usage, sessions and revoked tokens, file
downloads (ranges, relay errors) from a node's real upload code."""

from __future__ import annotations

import asyncio
import html
import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from infra.master import auth, web, wire
from infra.master.auth import Authenticator
from infra.master.config import Settings
from infra.master.controller import Controller
from infra.master.server import SettingsError, check
from infra.master.web import Dashboard, _by_attempt, _graph, _latest
from infra.node.uploads import upload_messages
from infra.protos import PROTOCOL_VERSION, infra_pb2

from .controller_kit import run_controller

PLAN = {"name": "web", "stages": [{"name": "s", "kind": "evaluate", "params": {"inputs": ["x"]}}]}


async def _running(c: Controller, owner: str | None = None) -> tuple[str, infra_pb2.Assignment, int]:
    """An experiment whose one stage runs on node n1 (registered here with one GPU)."""
    key = await c.submit(json.dumps(PLAN), owner)
    if "n1" not in c.nodes:
        facts = infra_pb2.NodeFacts(name="n1", cpu_count=4, memory_mib=8192, stage_kinds=["evaluate"])
        facts.gpus.add(index=0, name="H100", memory_mib=81559)
        reg = infra_pb2.RegisterRequest(protocol_version=PROTOCOL_VERSION, node_id="n1", facts=facts)
        c.session = (await c.register(reg)).session  # type: ignore[attr-defined]
        c.stream = c.assignments("n1", c.session).__aiter__()  # type: ignore[attr-defined]
    a = (await asyncio.wait_for(c.stream.__anext__(), 5)).assign  # type: ignore[attr-defined]
    await _report(c, a, infra_pb2.RUNNING)
    return key, a, c.session  # type: ignore[attr-defined]


async def _report(c: Controller, a: infra_pb2.Assignment, state: int) -> None:
    rep = infra_pb2.StageStatusReport(node_id="n1", attempt_id=a.attempt_id, lease_token=a.lease_token, state=state)
    assert (await c.report_status(rep))[0]


async def _events(c: Controller, a: infra_pb2.Assignment) -> None:
    batch = infra_pb2.EventBatch(node_id="n1")
    for seq in (1, 2):
        ev = batch.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=seq, time=1.0)
        ev.log.stream, ev.log.text = "stdout", f"line {seq}"
    for seq, step in ((3, 0), (4, 10)):
        ev = batch.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=seq, time=2.0)
        ev.metric.step = step
        ev.metric.values["loss"] = 2.0 - step / 10
        ev.metric.null_values.append("val_loss")
    assert (await c.report_events(batch))[0] == 4


def _serve(
    tmp_path: Path,
    scenario: Callable[[Controller, TestClient, Dashboard], Awaitable[None]],
    auth_on: bool = False,
    **options: Any,
) -> None:
    async def outer(c: Controller) -> None:
        dashboard = Dashboard(c, Authenticator(c.engine, c.read) if auth_on else None)
        async with TestClient(TestServer(dashboard.app())) as client:
            await scenario(c, client, dashboard)

    run_controller(tmp_path, outer, **{"heartbeat_interval": 1, "persist_interval": 10, **options})


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF field on the page"
    return match.group(1)


def test_pages_series_log_stream_and_cancel(tmp_path: Path) -> None:
    async def scenario(c: Controller, client: TestClient, _: Dashboard) -> None:
        key, a, session = await _running(c)
        await _events(c, a)
        hb = infra_pb2.HeartbeatRequest(node_id="n1", session=session)
        hb.usage.gpus.add(index=0, utilization_percent=37.0, memory_used_mib=1024, memory_total_mib=81559)
        c.heartbeat(hb)

        cluster = await (await client.get("/")).text()
        assert 'data-node="n1"' in cluster and "37 %" in cluster and "H100" in cluster
        scraped = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(await (await client.get("/metrics")).text())
            for s in f.samples
        }
        assert scraped[("infra_gpu_utilization_percent", (("gpu", "0"), ("node", "n1")))] == 37.0
        assert scraped[("infra_gpu_memory_used_bytes", (("gpu", "0"), ("node", "n1")))] == 1024 << 20
        assert scraped[("infra_events_stored_total", ())] == 0  # counted by the gRPC servicer, not driven here

        bad = await client.get("/experiments", params={"state": "lost"})
        assert bad.status == 400 and "state: 'lost'" in await bad.text()
        assert key in await (await client.get("/experiments", params={"state": "running"})).text()
        assert key not in await (await client.get("/experiments", params={"state": "succeeded"})).text()
        assert (await client.get("/experiments/nope-9")).status == 404

        series = await (await client.get(f"/experiments/{key}/stages/s/metrics.json")).json()
        assert series["series"] == {"loss": [[0, 2.0], [10, 1.0]]}  # a null value is no point

        await _report(c, a, infra_pb2.SUCCEEDED)
        # resumed after line 1: line 2 only, then the end of the finished stage, and the stream closes
        stream = await client.get(f"/experiments/{key}/stages/s/logs", headers={"Last-Event-ID": "1:1"})
        assert stream.headers["Content-Type"] == "text/event-stream"
        text = await asyncio.wait_for(stream.text(), 10)
        lines = [json.loads(d)["text"] for d in re.findall(r"event: line\ndata: (.*)\n", text)]
        assert lines == ["line 2"] and text.rstrip().endswith("event: end\ndata: succeeded")

        other, b, _ = await _running(c)
        page = await (await client.get(f"/experiments/{other}")).text()
        assert 'id="cancel"' in page
        refused = await client.post(f"/experiments/{other}/cancel", data={"csrf": "guess"}, allow_redirects=False)
        assert refused.status == 403 and c.experiments[other].state == "running"
        done = await client.post(f"/experiments/{other}/cancel", data={"csrf": _csrf(page)}, allow_redirects=False)
        assert done.status == 303 and c.experiments[other].cancel_requested

    _serve(tmp_path, scenario)


def test_each_gang_member_has_its_own_log_tab_and_stream(tmp_path: Path) -> None:
    from .test_gang import PORTS, _assign, _plan, _register, _train
    from .test_gang import _report as _gang_report

    async def scenario(c: Controller, client: TestClient, _: Dashboard) -> None:
        n1, n2 = await _register(c, "n1"), await _register(c, "n2")
        key = await c.submit(_plan("gang", [_train()]))
        for node, a in (("n1", await _assign(n1)), ("n2", await _assign(n2))):
            batch = infra_pb2.EventBatch(node_id=node)
            ev = batch.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=1, time=1.0)
            ev.log.stream, ev.log.text = "stdout", f"rank {a.rendezvous.node_rank}"
            assert (await c.report_events(batch))[0] == 1
            assert (await _gang_report(c, node, a, infra_pb2.SUCCEEDED))[0]
        page = await (await client.get(f"/experiments/{key}")).text()
        assert "train · member 0" in page and "train · member 1" in page
        for rank in (0, 1):
            assert f'data-src="/experiments/{key}/stages/train/logs?member={rank}"' in page
            text = await asyncio.wait_for(
                (await client.get(f"/experiments/{key}/stages/train/logs?member={rank}")).text(), 10
            )
            assert [json.loads(d)["text"] for d in re.findall(r"event: line\ndata: (.*)\n", text)] == [f"rank {rank}"]
        for bad, why in (("2", "has 2 member(s) (0 to 1); there is no member 2"), ("x", "'x' is not a member number")):
            refused = await client.get(f"/experiments/{key}/stages/train/logs", params={"member": bad})
            assert refused.status == 400 and why in await refused.text()

    _serve(tmp_path, scenario, rendezvous_ports=PORTS)


def test_a_retried_attempt_s_metrics_are_their_own_series() -> None:
    """A retry resumed from a checkpoint repeats steps: the latest attempt keeps the metric's name, an earlier
    one is named for its attempt (still ending in ``loss``, so it shares the loss chart)."""
    series = {(1, "loss"): [(0, 2.0), (20, 1.5)], (2, "loss"): [(10, 1.6), (20, 1.4)], (2, "lr"): [(10, 0.1)]}
    assert _by_attempt(series) == {
        "attempt 1: loss": [(0, 2.0), (20, 1.5)],
        "loss": [(10, 1.6), (20, 1.4)],
        "lr": [(10, 0.1)],
    }


def test_sessions_follow_tokens(tmp_path: Path) -> None:
    async def scenario(c: Controller, client: TestClient, dashboard: Dashboard) -> None:
        with Session(c.engine) as s, s.begin():
            alice, alice_row = auth.create_token(s, "alice", "user")
            node, _ = auth.create_token(s, "n", "node")
        mine, _, _ = await _running(c, owner="alice")
        theirs, _, _ = await _running(c, owner="bob")

        page = await client.get(f"/experiments/{mine}", headers={"Accept": "text/html"}, allow_redirects=False)
        assert page.status == 303 and page.headers["Location"].startswith("/login?next=")
        assert (await client.get(f"/experiments/{mine}/stages/s/metrics.json")).status == 401
        assert (await client.get("/metrics", headers={"Authorization": f"Bearer {node}"})).status == 403
        nodes_login = await client.post("/login", data={"token": node})
        assert nodes_login.status == 403 and "cannot log in" in await nodes_login.text()
        elsewhere = {"Origin": "http://elsewhere.example"}
        assert (await client.post("/login", data={"token": alice}, headers=elsewhere)).status == 403

        login = await client.post("/login", data={"token": alice, "next": "//evil.example/"}, allow_redirects=False)
        assert login.status == 303 and login.headers["Location"] == "/"  # never off this server
        assert "HttpOnly" in login.headers["Set-Cookie"] and "SameSite=Strict" in login.headers["Set-Cookie"]
        listing = await (await client.get("/experiments", params={"owner": "bob"})).text()
        assert mine in listing and theirs not in listing  # a user's filter is always themselves
        denied = await client.get(f"/experiments/{theirs}")
        assert denied.status == 403 and "belongs to 'bob'" in await denied.text()
        page = await (await client.get(f"/experiments/{mine}")).text()
        assert 'id="cancel"' not in page  # read-only
        cancel = await client.post(f"/experiments/{mine}/cancel", data={"csrf": _csrf(page)})
        assert cancel.status == 403 and "admin" in await cancel.text()

        with Session(c.engine) as s, s.begin():
            assert auth.revoke_token(s, alice_row["id"])
        dashboard.auth.forget(alice_row["id"])  # type: ignore[union-attr]
        gone = await client.get(f"/experiments/{mine}", headers={"Accept": "text/html"}, allow_redirects=False)
        assert gone.status == 303 and not dashboard.sessions  # the session went with its token

    _serve(tmp_path, scenario, auth_on=True)


def test_a_web_port_out_of_range_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="--web-port must be 0 .* not 70000"):
        check(Settings(db_url="sqlite://", web_port=70000))
    check(Settings(db_url="sqlite://", web_port=None))  # --no-web


def test_the_stage_graph_puts_each_stage_right_of_what_it_waits_for() -> None:
    def st(name: str, after: list[str], state: str = "pending") -> dict[str, Any]:
        return {"name": name, "after": after, "state": state}

    # listed out of order on purpose: columns come from the dependencies, not the listing
    svg = _graph(
        [
            st("evaluate", ["sample"]),
            st("prepare", [], "succeeded"),
            st("train", ["prepare"], "running"),
            st("sample", ["train"]),
            st("plot", ["train"]),
        ]
    )
    boxes = dict(re.findall(r'<g data-stage="([^"]+)">.*?<rect x="(\d+)"', svg))
    assert [int(boxes[n]) for n in ("prepare", "train", "sample", "evaluate")] == [16, 186, 356, 526]
    assert boxes["plot"] == boxes["sample"] and svg.count("<path") == 4
    assert 'fill="#dbe8ff"' in svg  # the running stage in its state's colour
    assert _graph([st("alone", [])]) == ""


def test_an_artifact_reported_again_is_listed_once_as_last_reported() -> None:
    def row(path: str, t: float) -> dict[str, Any]:
        return {"stage": "train", "attempt": 1, "time": t, "data": {"path": path, "kind": "checkpoint"}}

    assert [(r["time"], n) for r, n in _latest([row("last.pt", 1), row("best.pt", 2), row("last.pt", 3)])] == [
        (3, 2),
        (2, 1),
    ]


def test_https_with_the_master_s_certificate_and_client_certificates(tmp_path: Path) -> None:
    certs = pytest.importorskip("control.certs", reason="the TLS test needs the cryptography package")
    ca = certs.Authority(tmp_path / "pki", "ca")
    server, user = ca.issue("master", server=True), ca.issue("user")

    async def scenario(c: Controller) -> None:
        tls = web.tls_context(str(server.cert), str(server.key), str(ca.pem.cert))
        runner, port = await web.start(c, None, "127.0.0.1", 0, tls)
        try:

            def fetch(with_cert: bool) -> int:
                ctx = ssl.create_default_context(cafile=str(ca.pem.cert))
                if with_cert:
                    ctx.load_cert_chain(str(user.cert), str(user.key))
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=10) as resp:
                    return int(resp.status)

            assert await asyncio.to_thread(fetch, True) == 200
            with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
                await asyncio.to_thread(fetch, False)  # mutual TLS: no client certificate, no answer
        finally:
            await runner.cleanup()

    run_controller(tmp_path, scenario)


async def _answer_fetches(c: Controller, workdir: Path, session: int) -> None:
    """Node n1's side of the relay: each fetch on its command stream answered by the node's own upload code
    (100-byte chunks, so a file takes many); the upload of a file named ``cut.bin`` stops after 3 chunks."""

    async def each(messages: Iterable[infra_pb2.ArtifactChunk], cut: bool) -> AsyncIterator[infra_pb2.ArtifactChunk]:
        for i, m in enumerate(messages):
            if cut and i == 4:
                return
            yield m

    uploads: set[asyncio.Task[tuple[bool, str]]] = set()  # held: the loop keeps only weak references
    async for command in c.stream:  # type: ignore[attr-defined]
        if command.HasField("fetch"):
            upload = upload_messages(workdir, command.fetch, "n1", session, chunk=100)
            cut = command.fetch.path.endswith("cut.bin")
            task = asyncio.create_task(c.artifacts.receive(wire.pieces(each(upload, cut))))
            uploads.add(task)
            task.add_done_callback(uploads.discard)


def test_a_file_downloads_whole_or_from_a_range_and_relay_errors_have_statuses(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    data = bytes(range(256)) * 40

    async def scenario(c: Controller, client: TestClient, _: Dashboard) -> None:
        key, a, session = await _running(c)
        (workdir / "experiments" / key / "artifacts" / "s").mkdir(parents=True)
        (workdir / "experiments" / key / "artifacts/s/out näme.bin").write_bytes(data)
        (workdir / "experiments" / key / "artifacts/s/cut.bin").write_bytes(data)
        batch = infra_pb2.EventBatch(node_id="n1")
        ev = batch.events.add(attempt_id=a.attempt_id, lease_token=a.lease_token, seq=1, time=1.0)
        ev.artifact.path, ev.artifact.kind = f"experiments/{key}/artifacts/s/out näme.bin", "report"
        assert (await c.report_events(batch))[0] == 1
        node = asyncio.create_task(_answer_fetches(c, workdir, session))
        try:
            page = await (await client.get(f"/experiments/{key}")).text()
            link = re.search(r'<a class="download" href="([^"]+)" download>', page)
            assert link, "no download link on the experiment page"
            href = html.unescape(link.group(1))
            assert href == f"/experiments/{key}/files/artifacts/s/out%20n%C3%A4me.bin"

            whole = await client.get(href)
            assert whole.status == 200 and await whole.read() == data
            assert whole.headers["Content-Length"] == str(len(data)) and whole.headers["Accept-Ranges"] == "bytes"
            assert whole.headers["Content-Disposition"] == (
                "attachment; filename=\"out_n_me.bin\"; filename*=UTF-8''out%20n%C3%A4me.bin"
            )
            for asked, status, want, span in [
                ("bytes=1000-", 206, data[1000:], "bytes 1000-10239/10240"),
                ("bytes=150-349", 206, data[150:350], "bytes 150-349/10240"),  # ends mid-chunk
                ("bytes=-5", 206, data[-5:], "bytes 10235-10239/10240"),
                ("bytes=10000-99999", 206, data[10000:], "bytes 10000-10239/10240"),
            ]:
                part = await client.get(href, headers={"Range": asked})
                assert (part.status, await part.read(), part.headers["Content-Range"]) == (status, want, span), asked
            for bad in ("bytes=10240-", "bytes=5-2", "lines=0-5", "bytes=0-1,4-5", "bytes=-0", "bytes=x-"):
                refused = await client.get(href, headers={"Range": bad})
                assert refused.status == 416 and refused.headers["Content-Range"] == "bytes */10240", bad
            head = await client.head(href)
            assert head.status == 200 and head.headers["Content-Length"] == "10240"

            missing = await client.get(f"/experiments/{key}/files/artifacts/s/none.bin")
            assert missing.status == 404 and "node n1" in await missing.text()
            escape = await client.get(f"/experiments/{key}/files//etc/passwd")
            assert escape.status == 400 and "without '..'" in await escape.text()
            assert (await client.get("/experiments/nope-9/files/plan.json")).status == 404
            cut = await client.get(f"/experiments/{key}/files/artifacts/s/cut.bin")
            assert cut.status == 200 and cut.headers["Content-Length"] == "10240"
            with pytest.raises(aiohttp.ClientPayloadError):  # the node stopped: the body ends short, not padded
                await asyncio.wait_for(cut.read(), 30)
            c.artifacts.max_bytes = 10_000  # as --artifact-max-bytes sets it
            large = await client.get(href)
            assert large.status == 413 and "10240 bytes, over the master's limit of 10000 bytes" in await large.text()
            c.nodes["n1"].last_heartbeat = 1.0  # silent for ages: offline
            offline = await client.get(href)
            assert (
                offline.status == 503 and "node n1 holding artifacts/s/out näme.bin is offline" in await offline.text()
            )
        finally:
            node.cancel()

    _serve(tmp_path, scenario)
