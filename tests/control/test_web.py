"""The master's dashboard and /metrics: a real master and agent on loopback, scraped over HTTP and driven
in the system's headless Chromium (Playwright's driver, no downloaded browser).

With ``INFRA_DASHBOARD_SCREENSHOTS=<dir>`` the browser test also saves the cluster and experiment pages
there (how docs/images/dashboard-*.png are made).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.conftest import Cluster, wait_for

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.timeout(240)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Web:
    def __init__(self, cluster: Cluster, port: int) -> None:
        self.cluster = cluster
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, token: str = "") -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self, token: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics", token)
        assert status == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def _start(cluster: Cluster, *flags: str) -> Web:
    port = _free_port()
    cluster.start_master("--web-port", str(port), *flags)
    return Web(cluster, port)


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
    c.wait_online("alpha")
    before = web.scrape()
    assert before[("infra_nodes", (("state", "online"),))] == 1
    assert before[("infra_gpus", (("node", "alpha"),))] == 2
    assert before[("infra_gpus_allocated", (("node", "alpha"),))] == 0
    assert before[("infra_stage_queue_wait_seconds_count", ())] == 0
    assert before[("infra_events_stored_total", ())] == 0
    wait_for(lambda: web.scrape()[("infra_heartbeat_seconds_count", ())] > 0, 30, "a heartbeat to be timed")

    gate = c.tmp / "go"
    key = c.submit(_stream_plan("metrics", gate, gpus=1))
    running = wait_for(
        lambda: (m := web.scrape())[("infra_stages", (("state", "running"),))] == 1 and m,
        60,
        "the stage to run",
    )
    assert running[("infra_gpus_allocated", (("node", "alpha"),))] == 1
    assert running[("infra_stage_queue_wait_seconds_count", ())] == 1
    assert running[("infra_stage_dispatch_seconds_count", ())] == 1
    assert running[("infra_experiments", (("state", "running"),))] == 1
    gate.touch()
    assert c.wait_finished(key)["state"] == "succeeded"
    after = web.scrape()
    assert after[("infra_events_stored_total", ())] >= 12 + 6 + 1  # lines, metrics, the artifact
    assert after[("infra_stages", (("state", "running"),))] == 0
    assert after[("infra_gpus_allocated", (("node", "alpha"),))] == 0
    assert after[("infra_db_commit_seconds_count", ())] > running[("infra_db_commit_seconds_count", ())]


def _token(cluster: Cluster, *args: str) -> str:
    cmd = [sys.executable, "-m", "infra.cli", "token", "create", *args, "--db", cluster.db_url, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=60, check=True)
    return str(json.loads(out.stdout)["token"])


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium; .ci/run does)")
def test_dashboard_in_a_browser(sqlite_cluster: Cluster) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")
    c = sqlite_cluster
    admin, join, bob = _token(c, "--user", "root", "--admin"), _token(c, "--join"), _token(c, "--user", "bob")
    web = _start(c, "--auth")
    (c.tmp / "join.token").write_text(join)
    c.start_node("alpha", "--join-token-file", str(c.tmp / "join.token"), "--fake-gpus", "2", "--cpus", "2")
    c.env["INFRA_TOKEN"] = admin
    c.wait_online("alpha")
    shots = os.environ.get("INFRA_DASHBOARD_SCREENSHOTS")

    # without a token: the metrics endpoint says 401, a node's token is no login
    assert web.get("/metrics")[0] == 401
    assert web.get("/metrics", join)[0] == 403
    assert web.scrape(admin)[("infra_nodes", (("state", "online"),))] == 1

    gate = c.tmp / "go"
    key = c.submit(_stream_plan("browse", gate, lines=40))
    c.wait_for(lambda: c.status(key)["experiments"][0]["stages"][0]["state"] == "running", 60, "the stage to run")

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
            c.wait_finished(key)
            page.reload()
            points = page.locator("figure.chart path.series[data-name=value]").get_attribute("data-points")
            assert int(points or 0) == 20
            assert page.locator("#artifacts td code").first.inner_text().endswith("out.txt")
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
            c.wait_for(lambda: c.status(long)["experiments"][0]["state"] == "running", 60, "the probe to run")
            forged = page.request.post(f"{web.url}/experiments/{long}/cancel", form={"csrf": "guess"})
            assert forged.status == 403 and c.status(long)["experiments"][0]["state"] == "running"
            csrf = page.locator("#cancel-form input[name=csrf]")
            page.goto(f"{web.url}/experiments/{long}")
            elsewhere = {"Origin": "http://elsewhere.example"}
            cross = page.request.post(
                f"{web.url}/experiments/{long}/cancel",
                form={"csrf": csrf.get_attribute("value") or ""},
                headers=elsewhere,
            )
            assert cross.status == 403 and c.status(long)["experiments"][0]["state"] == "running"
            page.once("dialog", lambda d: d.accept())
            page.click("#cancel")
            c.wait_for(lambda: c.status(long)["experiments"][0]["state"] == "cancelled", 60, "the cancel")

            # a user reads only their own experiments, and cannot cancel
            other = browser.new_page()
            other.goto(f"{web.url}/login")
            other.fill("#token", bob)
            other.click("button[type=submit]")
            other.wait_for_url(f"{web.url}/")
            assert key not in other.goto(f"{web.url}/experiments").text()
            denied = other.goto(f"{web.url}/experiments/{key}")
            assert denied is not None and denied.status == 403 and "belongs to 'root'" in denied.text()
        finally:
            browser.close()
