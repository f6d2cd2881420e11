"""Progress reporting of the crystallm verbs: throttled ``progress`` events, and no bar without a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crystallm_core.events import JsonlSink, ProgressReporter, read_events
from tests.mcts_kit import prompt_formula, trained_tiny


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_events_are_throttled_and_the_last_state_is_always_sent(tmp_path: Path, monkeypatch: Any) -> None:
    clock = Clock()
    monkeypatch.setattr("crystallm_core.events.time.monotonic", clock)
    with JsonlSink(tmp_path / "ev.jsonl") as sink, ProgressReporter(sink, "work", 1000, every=0.5) as progress:
        for i in range(1, 1001):
            clock.now = i * 0.001  # a thousand updates in one second
            progress.update(i)
    got = [(e["done"], e["total"]) for e in read_events(tmp_path / "ev.jsonl")]
    assert got == [(1, 1000), (501, 1000), (1000, 1000)]  # the first at once, one per 0.5 s, the last on exit


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_tiny(tmp_path_factory.getbasetemp() / "progress-kit")


def test_sample_reports_progress_without_a_bar_in_logs(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALLM_EVENTS"}
    args = ["--model", str(ckpt), "--prompt", prompt_formula(), "--num-samples", "6", "--max-tokens", "48"]
    done = subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", "sample", *args, "--batch-size", "4", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    progress = [e for e in read_events(out / "events.jsonl") if e["type"] == "progress"]
    assert progress[0]["done"] == 0 and progress[-1] == {**progress[-1], "what": "sample", "done": 6, "total": 6}
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    assert "━" not in done.stderr  # stderr is no terminal here: no bar
