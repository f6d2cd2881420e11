"""The master's dashboard and /metrics: a real master and agent on loopback, scraped over HTTP and driven
in the system's headless Chromium (Playwright's driver, no downloaded browser).

With ``INFRA_DASHBOARD_SCREENSHOTS=<dir>`` the browser test also saves the cluster and experiment pages
there, to look at.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from control.conftest import Cluster, wait_for
from infra.master import auth
from infra.master.db import make_engine

CHROMIUM = Path("/usr/bin/chromium")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, sorted labels) -> value
pytestmark = pytest.mark.timeout(240)


class Web:
    def __init__(self, cluster: Cluster, url: str) -> None:
        self.cluster = cluster
        self.url = url

    def get(self, path: str, token: str = "") -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait(self, predicate: Callable[[Samples], Any], what: str, token: str = "") -> Samples:
        """The first scrape that satisfies ``predicate`` (scrapes are cheap: no CLI process per poll)."""

        def met() -> Samples | None:
            samples = self.scrape(token)
            return samples if predicate(samples) else None

        return wait_for(met, 60, what)  # type: ignore[no-any-return]

    def scrape(self, token: str = "") -> Samples:
        status, text = self.get("/metrics", token)
        assert status == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def _start(cluster: Cluster, *flags: str) -> Web:
    cluster.start_master("--web-port", "0", *flags)
    return Web(cluster, cluster.dashboard.rstrip("/"))


@pytest.fixture
def sqlite_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'master.db'}")
    try:
        yield c
    finally:
        c.stop()


def _stream_plan(name: str, gate: Path, lines: int = 12, gpus: int = 0) -> dict[str, Any]:
    params = {"lines": lines, "metric_every": 2, "interval": 0.05, "gate": str(gate)}
    return {
        "name": name,
        "stages": [{"name": "train", "kind": "stream", "params": params, "resources": {"gpus": gpus}}],
    }


def test_metrics_follow_a_stage(sqlite_cluster: Cluster) -> None:
    c = sqlite_cluster
    web = _start(c)
    c.start_node("alpha", "--fake-gpus", "2", "--cpus", "2", "--memory", "4GiB")
    before = web.wait(lambda m: m[("infra_nodes", (("state", "online"),))] == 1, "the node to be online")
    assert before[("infra_gpus", (("node", "alpha"),))] == 2
    assert before[("infra_gpus_allocated", (("node", "alpha"),))] == 0
    assert before[("infra_stage_queue_wait_seconds_count", ())] == 0
    assert before[("infra_events_stored_total", ())] == 0
    wait_for(lambda: web.scrape()[("infra_heartbeat_seconds_count", ())] > 0, 30, "a heartbeat to be timed")

    gate = c.tmp / "go"
    key = c.submit(_stream_plan("metrics", gate, gpus=1))
    # The dispatch histogram is fed from the committed transition, which can trail the in-memory state
    # that the stage gauge reads by a scrape: wait for both.
    running = web.wait(
        lambda m: (
            m[("infra_stages", (("state", "running"),))] == 1 and m[("infra_stage_dispatch_seconds_count", ())] == 1
        ),
        "the stage to run and its dispatch to be timed",
    )
    assert running[("infra_gpus_allocated", (("node", "alpha"),))] == 1
    assert running[("infra_stage_queue_wait_seconds_count", ())] == 1
    assert running[("infra_experiments", (("state", "running"),))] == 1
    gate.touch()
    after = web.wait(lambda m: not m.get(("infra_experiments", (("state", "running"),))), "the experiment to end")
    assert c.status(key)["experiments"][0]["state"] == "succeeded"
    assert after[("infra_events_stored_total", ())] >= 12 + 6 + 1  # lines, metrics, the artifact
    assert after[("infra_stages", (("state", "running"),))] == 0
    assert after[("infra_gpus_allocated", (("node", "alpha"),))] == 0
    assert after[("infra_db_commit_seconds_count", ())] > running[("infra_db_commit_seconds_count", ())]


def _tokens(db_url: str, *who: tuple[str, str]) -> list[str]:
    """Tokens (user, role) written straight into the master's database, as `infra token create --db` does."""
    engine = make_engine(db_url)
    try:
        with Session(engine) as s, s.begin():
            return [auth.create_token(s, user, role)[0] for user, role in who]
    finally:
        engine.dispose()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium; .ci/run does)")
def test_dashboard_in_a_browser(sqlite_cluster: Cluster) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")
    c = sqlite_cluster
    web = _start(c, "--auth")
    admin, join, bob = _tokens(c.db_url, ("root", "admin"), ("alpha", "node"), ("bob", "user"))
    (c.tmp / "join.token").write_text(join)
    c.start_node("alpha", "--join-token-file", str(c.tmp / "join.token"), "--fake-gpus", "2", "--cpus", "2")
    c.env["INFRA_TOKEN"] = admin
    web.wait(lambda m: m[("infra_nodes", (("state", "online"),))] == 1, "the node to be online", admin)
    shots = os.environ.get("INFRA_DASHBOARD_SCREENSHOTS")

    # without a token: the metrics endpoint says 401, a node's token is no login
    assert web.get("/metrics")[0] == 401
    assert web.get("/metrics", join)[0] == 403
    assert web.scrape(admin)[("infra_nodes", (("state", "online"),))] == 1

    gate = c.tmp / "go"
    key = c.submit(_stream_plan("browse", gate, lines=40))
    running = (("infra_stages", (("state", "running"),)), 1)
    web.wait(lambda m: m[running[0]] == running[1], "the stage to run", admin)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            # a visitor without a session is sent to the login page, and back after logging in
            page.goto(f"{web.url}/experiments/{key}")
            assert "/login" in page.url
            page.fill("#token", "inf1.1.wrong")
            page.click("button[type=submit]")
            assert "invalid token" in page.content()
            page.fill("#token", admin)
            page.click("button[type=submit]")
            page.wait_for_url(f"**/experiments/{key}")

            # a log line that arrives while the page is open appears in it
            log = page.locator("#log")
            assert "line 39" not in log.inner_text()
            gate.touch()
            sync_api.expect(log).to_contain_text("line 39", timeout=60_000)
            assert "line 0" in log.inner_text()
            # the stage's metric is charted once the page's next poll sees it
            page.wait_for_selector("figure.chart path.series[data-name=value]", timeout=60_000)
            web.wait(lambda m: m[running[0]] == 0, "the stage to end", admin)
            page.reload()
            points = page.locator("figure.chart path.series[data-name=value]").get_attribute("data-points")
            assert int(points or 0) == 20
            listed = page.locator("#artifacts td code").first.inner_text()
            assert listed.endswith("out.txt")
            # its link downloads the file from the node, through the page's session; a range resumes it
            original = (c.workdir("alpha") / listed).read_bytes()
            with page.expect_download() as download:
                page.locator("#artifacts a.download").first.click()
            assert download.value.suggested_filename == "out.txt"
            assert Path(download.value.path()).read_bytes() == original == b"done\n"
            href = page.locator("#artifacts a.download").first.get_attribute("href") or ""
            part = page.request.get(web.url + href, headers={"Range": "bytes=2-"})
            assert part.status == 206 and part.body() == b"ne\n"
            assert web.get(href)[0] == 401  # no session, no token
            if shots:
                page.screenshot(path=str(Path(shots) / "dashboard-experiment.png"), full_page=True)

            # the cluster page lists the live node
            page.goto(web.url + "/")
            row = page.locator("#nodes tr[data-node=alpha]")
            assert "online" in row.inner_text()
            assert row.locator(".gpu").count() == 2
            if shots:
                page.screenshot(path=str(Path(shots) / "dashboard-cluster.png"))

            # an admin cancels a running experiment (a form carrying its CSRF token; without it, refused)
            long = c.submit({"name": "long", "stages": [{"name": "wait", "kind": "probe", "params": {"seconds": 120}}]})
            web.wait(lambda m: m[running[0]] == running[1], "the probe to run", admin)
            forged = page.request.post(f"{web.url}/experiments/{long}/cancel", form={"csrf": "guess"})
            assert forged.status == 403
            csrf = page.locator("#cancel-form input[name=csrf]")
            page.goto(f"{web.url}/experiments/{long}")
            elsewhere = {"Origin": "http://elsewhere.example"}
            cross = page.request.post(
                f"{web.url}/experiments/{long}/cancel",
                form={"csrf": csrf.get_attribute("value") or ""},
                headers=elsewhere,
            )
            assert cross.status == 403 and web.scrape(admin)[running[0]] == 1  # neither cancelled it
            page.once("dialog", lambda d: d.accept())
            page.click("#cancel")
            web.wait(lambda m: m[running[0]] == 0, "the cancel", admin)
            assert c.status(long)["experiments"][0]["state"] == "cancelled"

            # a user reads only their own experiments, and cannot cancel
            other = browser.new_page()
            other.goto(f"{web.url}/login")
            other.fill("#token", bob)
            other.click("button[type=submit]")
            other.wait_for_url(f"{web.url}/")
            assert key not in other.goto(f"{web.url}/experiments").text()
            denied = other.goto(f"{web.url}/experiments/{key}")
            assert denied is not None and denied.status == 403 and "belongs to 'root'" in denied.text()
            theirs = other.request.get(web.url + href)
            assert theirs.status == 403 and "belongs to 'root'" in theirs.text()
        finally:
            browser.close()
