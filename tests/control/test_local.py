"""infra-train: a plan run locally, in dependency order, with the node's stage runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import STAGEKIT

PLAN = {
    "name": "local",
    "stages": [
        {"name": "b", "kind": "probe", "after": ["a"], "params": {"metrics": 1}},
        {"name": "a", "kind": "probe", "params": {"metrics": 2}},
        {"name": "bad", "kind": "probe", "after": ["a"], "params": {"exit_code": 4}, "max_retries": 1},
        {"name": "after-bad", "kind": "probe", "after": ["bad"]},
    ],
}


def test_infra_train_runs_in_dependency_order(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(PLAN))
    env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp_path / "cfg"), "INFRA_STAGE_MODULES": str(STAGEKIT)}
    cmd = [sys.executable, "-m", "infra.local", str(plan), "--workdir", str(tmp_path / "w"), "--experiment", "x"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    exp = tmp_path / "w" / "experiments" / "x"
    lines = result.stdout.splitlines()
    starts = [line.split("]")[0][1:] for line in lines if "CUDA_VISIBLE_DEVICES=''" in line]
    assert starts == ["a", "b", "bad", "bad"]  # a first, bad retried once, after-bad never started
    assert any(line.split() == ["after-bad", "skipped", "'bad'", "did", "not", "succeed"] for line in lines)
    assert (exp / "a" / "out.txt").exists() and (exp / "bad.attempt-1").is_dir()
    assert not (exp / "after-bad").exists()


def test_infra_train_rejects_a_bad_plan(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"name": "x", "stages": [{"name": "a", "kind": "nope"}]}))
    result = subprocess.run(
        [sys.executable, "-m", "infra.local", str(plan), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "stages[0].kind: unknown stage kind 'nope'" in result.stderr
