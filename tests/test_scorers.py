"""Scorers: the registry and options, the random and CHGNet scorers, and the ZeroMQ server and client
(real ``crystallm scorer serve`` subprocesses on 127.0.0.1)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from pymatgen.core import Lattice, Structure

from crystallm_core.cif import canonicalize
from crystallm_core.scorer_server import PROTOCOL
from crystallm_core.scorers import (
    Scorer,
    ScorerError,
    ScoreResult,
    failure,
    make_scorer,
    parse_options,
    score_checked,
)

CIFS = [f"data_X{i}\n_cell_length_a {i}.0\n" for i in range(7)]


def cli_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no configured workdir (so no stray plugins) and single-threaded torch."""
    env = {k: v for k, v in os.environ.items() if k != "INFRA_WKDIR"}
    env.update(INFRA_CONFIG_DIR=str(tmp_path / "config"), OMP_NUM_THREADS="1")
    return env


class Server:
    """A ``crystallm scorer serve`` subprocess; stopped (and reaped) by :meth:`stop`."""

    def __init__(self, env: dict[str, str], bind: str = "tcp://127.0.0.1:*", *extra: str) -> None:
        argv = [sys.executable, "-m", "crystallm_core.cli", "scorer", "serve", "--scorer", "random", "--bind", bind]
        self.proc = subprocess.Popen(
            [*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        line = self._first_line(timeout=60)
        match = re.search(r"on (tcp://\S+)", line)
        if not match:
            self.stop()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = match.group(1)

    def _first_line(self, timeout: float) -> str:
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return got[0] if got else ""

    def stop(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    s = Server(cli_env(tmp_path), "tcp://127.0.0.1:*", "--option", "fail_rate=0.3", "--max-bytes", "4096")
    try:
        yield s
    finally:
        s.stop()


# ---------------------------------------------------------------- registry, options, random


def test_random_scorer_is_deterministic_by_seed_and_text():
    a = make_scorer("random", {"seed": 7}).score(CIFS)
    b = make_scorer("random", {"seed": 7}).score(list(reversed(CIFS)))
    assert a == list(reversed(b))
    c = make_scorer("random", {"seed": 8}).score(CIFS)
    assert [r.score for r in a] != [r.score for r in c]
    assert all(r.ok and -10.0 <= r.score < 0.0 for r in a)


def test_make_scorer_passes_defaults_only_to_factories_that_take_them_and_names_bad_options():
    scorer = make_scorer("random", {"low": 1.0, "high": 2.0}, device="cuda", seed=3)  # random takes seed, not device
    assert scorer.seed == 3 and 1.0 <= scorer.score(["x"])[0].score < 2.0
    with pytest.raises(ScorerError, match=r"does not take option\(s\) colour \(--scorer-option\); it takes: .*seed"):
        make_scorer("random", {"colour": "red"})
    with pytest.raises(ScorerError, match="high .* must be greater than low"):
        make_scorer("random", {"low": 1.0, "high": 0.0})
    with pytest.raises(ScorerError, match="unknown scorer 'nope'; registered: .*random"):
        make_scorer("nope")


def test_options_parse_json_scalars_and_name_the_flag():
    assert parse_options(["a=1", "b=0.5", "c=true", "d=cuda:0", "e=null"], "--x") == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "cuda:0",
        "e": None,
    }
    with pytest.raises(ValueError, match="--scorer-option 'oops': expected KEY=VALUE"):
        parse_options(["oops"], "--scorer-option")
    with pytest.raises(ValueError, match="--option a is given twice"):
        parse_options(["a=1", "a=2"], "--option")


def test_score_checked_enforces_the_contract():
    class Short(Scorer):
        def score(self, cifs):
            return [ScoreResult(score=1.0)]

    class NaN(Scorer):
        def score(self, cifs):
            return [ScoreResult(score=math.nan) for _ in cifs]

    with pytest.raises(ScorerError, match="returned 1 results for 2 CIFs"):
        score_checked(Short(), ["a", "b"])
    assert score_checked(NaN(), ["a"]) == [failure("non-finite score nan")]
    with pytest.raises(ValueError, match="exactly one of score and error"):
        ScoreResult()


# ---------------------------------------------------------------- ZeroMQ server and client


def test_zmq_client_scores_a_batch_like_the_scorer_itself(server):
    local = make_scorer("random", {"fail_rate": 0.3}).score(CIFS)
    with make_scorer("zmq", {"address": server.address, "timeout": 10, "batch_size": 3}) as client:
        remote = client.score(CIFS)
        assert client.requests == 3  # 7 CIFs in batches of 3
    assert remote == local
    assert any(not r.ok for r in remote) and any(r.ok for r in remote)  # per-item errors travel too


def test_scorer_score_verb_through_the_zmq_client(server, tmp_path):
    cif = tmp_path / "one.cif"
    cif.write_text(CIFS[1])
    done = subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", "scorer", "score", "--scorer", "zmq"]
        + ["--option", f"address={server.address}", str(cif)],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert line["id"] == "one"
    assert line == {
        "id": "one",
        "source": str(cif),
        **make_scorer("random", {"fail_rate": 0.3}).score([CIFS[1]])[0].to_dict(),
    }


def test_zmq_client_survives_a_server_restart_on_the_same_port(tmp_path):
    env = cli_env(tmp_path)
    first = Server(env)
    second = None
    try:
        client = make_scorer("zmq", {"address": first.address, "timeout": 1.0, "retries": 8, "backoff": 0.1})
        assert client.score(CIFS[:2]) == make_scorer("random").score(CIFS[:2])
        first.stop()
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(_try(client.score, CIFS)))
        worker.start()  # requests now go unanswered and are retried
        time.sleep(1.5)
        second = Server(env, first.address)
        worker.join(timeout=60)
        assert result and result[0] == make_scorer("random").score(CIFS), result
        assert client.timeouts >= 1
        client.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return exc


def test_zmq_client_fails_clearly_when_the_server_is_gone(tmp_path):
    s = Server(cli_env(tmp_path))
    s.stop()
    with make_scorer("zmq", {"address": s.address, "timeout": 0.3, "retries": 2, "backoff": 0.05}) as client:
        t0 = time.monotonic()
        with pytest.raises(ScorerError, match=rf"scorer server at {re.escape(s.address)} did not answer .*3 attempts"):
            client.score(CIFS[:1])
        assert time.monotonic() - t0 < 5


def _ask(sock: zmq.Socket, *frames: bytes) -> dict:
    sock.send_multipart([b"", *frames])
    assert sock.poll(10_000), "no reply"
    return json.loads(sock.recv_multipart()[-1])


def test_malformed_requests_get_error_replies_and_the_server_keeps_serving(server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        cases = [
            (b"{not json", None, "request is not JSON"),
            (b"\xff\xfe", None, "not UTF-8"),
            (b"[1, 2]", None, "must be a JSON object, got list"),
            (json.dumps({"protocol": 1, "cifs": []}).encode(), None, "field 'id' must be a string"),
            (json.dumps({"protocol": 2, "id": "a", "cifs": []}).encode(), "a", "speaks protocol 2; this side speaks 1"),
            (json.dumps({"protocol": "1", "id": "b", "cifs": []}).encode(), "b", "'protocol' must be the integer 1"),
            (json.dumps({"protocol": 1, "id": "c", "cifs": "data_"}).encode(), "c", "'cifs' must be a list"),
            (json.dumps({"protocol": 1, "id": "d", "cifs": ["ok", 5]}).encode(), "d", "item 1 is int, not a string"),
            (json.dumps({"protocol": 1, "id": "e", "cifs": [], "x": 1}).encode(), "e", "unknown field"),
            (json.dumps({"protocol": 1, "id": "f", "cifs": ["x" * 5000]}).encode(), None, "exceeds the limit of 4096"),
        ]
        for payload, rid, message in cases:
            reply = _ask(sock, payload)
            assert reply["protocol"] == PROTOCOL and reply["id"] == rid and message in reply["error"], (payload, reply)
        assert "expected one message frame" in _ask(sock, b"a", b"b")["error"]
        good = _ask(sock, json.dumps({"protocol": 1, "id": "ok", "cifs": CIFS[:2]}).encode())
        assert good["id"] == "ok" and len(good["results"]) == 2
        req = ctx.socket(zmq.REQ)  # plain REQ clients are served too
        req.setsockopt(zmq.LINGER, 0)
        req.connect(server.address)
        req.send(json.dumps({"protocol": 1, "id": "r", "cifs": CIFS[:1]}).encode())
        assert req.poll(10_000) and json.loads(req.recv())["results"][0] == good["results"][0]
        req.close()
    finally:
        sock.close()
        ctx.term()
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped after 13 requests" in server.proc.stdout.read()


def test_server_stops_cleanly_on_sigint_and_refuses_a_busy_address(tmp_path):
    env = cli_env(tmp_path)
    s = Server(env)
    try:
        busy = subprocess.run(
            [sys.executable, "-m", "crystallm_core.cli", "scorer", "serve", "--scorer", "random", "--bind", s.address],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert busy.returncode == 2 and f"--bind cannot bind {s.address}" in busy.stderr
        assert s.stop(signal.SIGINT) == 0
    finally:
        s.stop()


# ---------------------------------------------------------------- CHGNet


def test_chgnet_ranks_diamond_below_random_carbon_of_the_same_density():
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install 'infra[chgnet]')")
    a = 3.567
    diamond = Structure.from_spacegroup("Fd-3m", Lattice.cubic(a), ["C"], [[0, 0, 0]])
    rng = np.random.default_rng(0)
    coords: list[np.ndarray] = []
    while len(coords) < len(diamond):  # random positions, no two atoms closer than 1.3 Å
        p = rng.random(3)
        trial = Structure(Lattice.cubic(a), ["C"] * (len(coords) + 1), [*coords, p])
        if len(coords) == 0 or min(trial.get_distance(len(coords), j) for j in range(len(coords))) > 1.3:
            coords.append(p)
    shuffled = Structure(Lattice.cubic(a), ["C"] * len(coords), coords)
    assert math.isclose(shuffled.density, diamond.density)
    with make_scorer("chgnet", {"batch_size": 2}, device="cpu") as scorer:
        results = scorer.score([canonicalize(diamond).text, canonicalize(shuffled).text, "data_nothing\n"])
    assert results[0].ok and results[1].ok, results
    assert results[0].score < results[1].score
    assert -10.0 < results[0].score < -8.0  # CHGNet 0.3.0 puts diamond near -9.1 eV/atom
    assert results[2].error.startswith("unparseable")


def test_chgnet_graphs_built_on_a_worker_pool_score_as_in_process(perov_rows):
    """workers > 0 moves CIF reading and graph building to a pool: same scores, same failures, same order."""
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install 'infra[chgnet]')")
    cifs = [canonicalize(Structure.from_str(r["cif"], fmt="cif")).text for r in perov_rows[:20]]
    cifs.insert(7, "data_nothing\n")
    with make_scorer("chgnet", {"workers": 0}, device="cpu") as scorer:
        alone = scorer.score(cifs)
    with make_scorer("chgnet", {"workers": 2}, device="cpu") as scorer:
        assert scorer.pool is not None
        pooled = scorer.score(cifs)
    assert [r.error for r in pooled] == [r.error for r in alone]
    assert pooled[7].error.startswith("unparseable") and all(r.ok for i, r in enumerate(pooled) if i != 7)
    assert [r.score for r in pooled] == pytest.approx([r.score for r in alone], abs=1e-5)
    with pytest.raises(ScorerError, match="workers"):
        make_scorer("chgnet", {"workers": -1}, device="cpu")


def test_chgnet_batched_featurization_predicts_what_chgnet_itself_predicts(perov_rows, carbon_rows):
    """predict_energies replaces CHGNet's per-graph batching; the energies must not change (float32 rounding)."""
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install 'infra[chgnet]')")
    from crystallm_core.cif import parse_structure
    from infra.plugins.scorers.chgnet_scorer import build_graph, predict_energies

    cifs = [r["cif"] for r in perov_rows[:12] + carbon_rows[:6]]  # 5-atom perovskites and carbon_24 cells
    with make_scorer("chgnet", {"workers": 0}, device="cpu") as scorer:
        model = scorer.model
        graphs = [build_graph(model.graph_converter, text, 500) for text in cifs]
        ours = predict_energies(model, graphs)
        theirs = model.predict_structure([parse_structure(t) for t in cifs], task="e", batch_size=len(cifs))
    assert ours.shape == (len(cifs),)
    assert ours == pytest.approx([float(p["e"]) for p in theirs], abs=1e-5)
    assert len(set(np.round(ours, 3))) > 10  # distinct structures, distinct energies: nothing was mixed up


def test_batches_close_at_the_memory_budget_and_count():
    from infra.plugins.scorers.chgnet_scorer import plan_batches

    assert plan_batches([1, 1, 1, 1, 1], batch_size=2, budget=10) == [range(0, 2), range(2, 4), range(4, 5)]
    assert plan_batches([4, 4, 4, 1], batch_size=10, budget=8) == [range(0, 2), range(2, 4)]
    assert plan_batches([3, 20, 3, 3], batch_size=10, budget=8) == [range(0, 1), range(2, 4)]  # 20: alone, failed
    assert plan_batches([], batch_size=4, budget=8) == []


def test_dense_carbon_cells_are_split_to_stay_within_the_memory_budget(carbon_rows, monkeypatch):
    """Dense carbon_24 cells have tens of thousands of angles each: with a small budget, one call of many cells
    is predicted in several batches, each within the budget, with the energies of one large batch; a cell above
    the budget on its own fails with its size instead of running."""
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install 'infra[chgnet]')")
    from infra.plugins.scorers import chgnet_scorer

    cifs = [r["cif"] for r in carbon_rows[:12]]
    with make_scorer("chgnet", {"workers": 0, "max_batch_mib": 100_000}, device="cpu") as scorer:
        whole = scorer.score(cifs)
    seen: list[int] = []
    real = chgnet_scorer.predict_energies

    def spy(model, batch):
        seen.append(sum(chgnet_scorer.graph_bytes(g) for g in batch))
        return real(model, batch)

    monkeypatch.setattr(chgnet_scorer, "predict_energies", spy)
    with make_scorer("chgnet", {"workers": 0, "max_batch_mib": 64}, device="cpu") as scorer:
        split = scorer.score(cifs)
    assert len(seen) > 1 and max(seen) <= 64 * 2**20, seen
    assert [r.score for r in split] == pytest.approx([r.score for r in whole], abs=1e-5)

    seen.clear()
    with make_scorer("chgnet", {"workers": 0, "max_batch_mib": 16}, device="cpu") as scorer:
        tight = scorer.score(cifs)
    too_big = [r for r in tight if not r.ok]
    assert too_big and all("memory budget of 16 MiB" in r.error for r in too_big)
    assert all(total <= 16 * 2**20 for total in seen)
    with pytest.raises(ScorerError, match="max_batch_mib"):
        make_scorer("chgnet", {"max_batch_mib": 0}, device="cpu")
