import json
import subprocess
import sys

import pytest

from crystallm_core.csp import keep, score
from crystallm_core.events import JsonlSink
from crystallm_core.train import TrainConfig, Trainer
from tests.conftest import PEROV_TEST


def test_match_rate_and_rmse_at_1_and_n():
    rms = [[None, 0.2, 0.1], [0.3, None, None], [None, None, None], [None, None, 0.05]]
    assert score(rms, 1) == (0.25, pytest.approx(0.3))
    rate, rmse = score(rms, 3)
    assert rate == 0.75 and rmse == pytest.approx((0.1 + 0.3 + 0.05) / 3)


def test_each_rule_keeps_only_the_attempts_it_allows():
    rms = [[None, 0.2, 0.1], [0.3, None, None]]
    allowed = [[True, False, True], [False, True, True]]
    assert keep(rms, allowed) == [[None, None, 0.1], [None, None, None]]
    assert score(keep(rms, allowed), 3) == (0.5, pytest.approx(0.1))


def test_benchmark_smoke_runs_end_to_end(demo_small, tmp_path):
    if not PEROV_TEST.exists():
        pytest.skip(f"{PEROV_TEST} is missing")
    cfg = TrainConfig(data_dir=str(demo_small), out_dir=str(tmp_path / "run"), model="tiny", max_steps=2,
                      batch_size=2, block_size=128, eval_interval=2, eval_batches=1)  # fmt: skip
    with JsonlSink(tmp_path / "events.jsonl") as sink:
        Trainer(cfg).run(sink)
    out = tmp_path / "csp"
    done = subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", "benchmark", "csp", "--model", str(tmp_path / "run/ckpts/last.pt"),
         "--test", str(PEROV_TEST), "--smoke", "--workers", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["structures"] == 8 and result["attempts"] == 16
    assert 0.0 <= result["validity"] <= 1.0 and result["match_rate_1"] <= result["match_rate_n"]
    assert 0.0 <= result["published_validity"] <= 1.0
    assert result["published_match_rate_1"] <= result["published_match_rate_n"]
    assert json.loads((out / "csp.json").read_text()) == result
    assert (out / "samples.csv.gz").exists()


def test_a_match_that_runs_too_long_counts_as_no_match(monkeypatch, perov_rows):
    import time

    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystallm_core import csp

    truth = perov_rows[0]["cif"]
    monkeypatch.setattr(csp, "MATCH_TIMEOUT_S", 0.05)
    rms, timeouts = csp.match_all([(truth, [truth, None, truth])], workers=1)
    assert timeouts == [0] and rms[0][0] == pytest.approx(0.0, abs=1e-6) and rms[0][1] is None

    monkeypatch.setattr(StructureMatcher, "get_rms_dist", lambda self, a, b: time.sleep(5))
    start = time.monotonic()
    rms, timeouts = csp.match_all([(truth, [truth, None, truth])], workers=1)
    assert rms == [[None, None, None]] and timeouts == [2] and time.monotonic() - start < 2


def test_attempts_are_matched_as_separate_tasks_in_order(perov_rows):
    """One task per attempt (a composition whose attempts all run long no longer holds one worker for n
    limits in a row); results come back per job, in order, with the same distances on 1 or 2 processes."""
    from crystallm_core import csp

    a, b = perov_rows[0]["cif"], perov_rows[1]["cif"]
    jobs = [(a, [None, None]), (a, [a, None, b]), (b, [b, a])]
    seen: list[int] = []
    rms, timeouts = csp.match_all(jobs, workers=1, on_progress=seen.append)
    assert rms[0] == [None, None] and rms[1][0] == pytest.approx(0.0, abs=1e-6) and rms[1][1:] == [None, None]
    assert rms[2][0] == pytest.approx(0.0, abs=1e-6) and rms[2][1] is None and timeouts == [0, 0, 0]
    assert seen == [1, 2, 3]
    assert csp.match_all(jobs, workers=2) == (rms, timeouts)


def test_a_split_of_a_prepared_data_set_is_read_as_test_structures(demo_small, demo8):
    from crystallm_core.prepare import split_cifs
    from crystallm_core.store import Store

    with Store.open(demo_small / "structures.sqlite") as store:
        held_out = [r.cif for r in store.iter_rows() if r.split == "test"]
    assert held_out and split_cifs(demo_small, "test") == held_out
    with pytest.raises(ValueError, match="its test split is empty"):
        split_cifs(demo8, "test")
    with pytest.raises(ValueError, match="not a prepared data set"):
        split_cifs(demo8.parent, "test")
