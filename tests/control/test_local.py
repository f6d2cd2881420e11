"""infra-train: a plan run locally, in dependency order, with the node's stage runner, into the experiment layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crystallm_core.layout import RESERVED_NAMES, ExperimentLayout

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
DEMO = {  # the demo chain in smoke mode: every built-in product of the layout, in seconds
    "name": "tiny",
    "smoke": True,
    "resources": {"gpus": 0, "cpus": 1, "memory": "2GiB"},
    "stages": [
        {"name": "prepare", "kind": "prepare", "params": {"demo": {"n": 24, "seed": 0}, "workers": 1}},
        {"name": "train", "kind": "train", "after": ["prepare"], "params": {"model": "tiny"}},
        {"name": "sample", "kind": "sample", "after": ["train"], "params": {"prompt": "Na4Cl4", "seed": 0}},
        {"name": "evaluate", "kind": "evaluate", "after": ["sample"], "params": {"inputs": ["samples/sample"]}},
        {"name": "curves", "kind": "plot", "after": ["train"]},
    ],
}


def _infra_train(tmp_path: Path, plan: dict, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("CRYSTALLM_EVENTS", "INFRA_WKDIR")}
    env.update(INFRA_CONFIG_DIR=str(tmp_path / "cfg"), INFRA_STAGE_MODULES=str(STAGEKIT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "infra.local", str(path), "--workdir", str(tmp_path / "w"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def test_infra_train_runs_in_dependency_order(tmp_path: Path) -> None:
    result = _infra_train(tmp_path, PLAN, "--experiment", "x")
    assert result.returncode == 1, result.stderr
    exp = tmp_path / "w" / "experiments" / "x"
    lines = result.stdout.splitlines()
    starts = [line.split("]")[0][1:] for line in lines if "CUDA_VISIBLE_DEVICES=''" in line]
    assert starts == ["a", "b", "bad", "bad"]  # a first, bad retried once, after-bad never started
    assert any(line.split() == ["after-bad", "skipped", "'bad'", "did", "not", "succeed"] for line in lines)
    assert (exp / "artifacts" / "a" / "out.txt").exists()
    # the first attempt of bad is kept beside the second, file by file
    for kept in (
        "work/bad.attempt-1",
        "artifacts/bad.attempt-1",
        "logs/bad.attempt-1.log",
        "metrics/bad.attempt-1.jsonl",
    ):
        assert (exp / kept).exists(), kept
    assert "CUDA_VISIBLE_DEVICES=''" in (exp / "logs" / "bad.log").read_text()
    assert not (exp / "work" / "after-bad").exists() and not (exp / "logs" / "after-bad.log").exists()


def test_infra_train_rejects_a_bad_plan(tmp_path: Path) -> None:
    result = _infra_train(tmp_path, {"name": "x", "stages": [{"name": "a", "kind": "nope"}]})
    assert result.returncode == 2 and "stages[0].kind: unknown stage kind 'nope'" in result.stderr
    result = _infra_train(tmp_path, {"name": "x", "stages": [{"name": "../up", "kind": "probe"}]})
    assert result.returncode == 2 and "stages[0].name: '../up' is not a valid name" in result.stderr


def test_infra_train_fails_a_stage_whose_scorer_no_plugin_registers(tmp_path: Path) -> None:
    mcts = {"prompt": "NaCl", "scorer": "nope"}
    plan = {
        "name": "x",
        "resources": {"gpus": 0},
        "stages": [{"name": "m", "kind": "mcts", "params": mcts}, {"name": "p", "kind": "probe"}],
    }
    result = _infra_train(tmp_path, plan, "--experiment", "x")
    assert result.returncode == 1
    assert any(line.split()[:2] == ["p", "succeeded"] for line in result.stdout.splitlines())
    assert "m                failed     needs scorer:nope, which this machine lacks" in result.stdout


@pytest.mark.slow
def test_a_plan_run_by_infra_train_is_exactly_the_experiment_layout(tmp_path: Path) -> None:
    started = time.monotonic()
    result = _infra_train(tmp_path, DEMO, "--experiment", "tiny", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    exp = tmp_path / "w" / "experiments" / "tiny"
    stages = [s["name"] for s in DEMO["stages"]]
    assert {p.name for p in exp.iterdir()} == RESERVED_NAMES  # plan.json, env.json and the standard folders
    assert sorted(p.name for p in (exp / "logs").iterdir()) == sorted(f"{s}.log" for s in stages)
    assert sorted(p.name for p in (exp / "metrics").iterdir()) == sorted(f"{s}.jsonl" for s in stages)
    assert sorted(p.name for p in (exp / "work").iterdir()) == sorted(stages)
    assert {p.name for p in (exp / "ckpts").iterdir()} == {"last.pt", "best.pt"}
    assert (exp / "data" / "meta.json").exists() and (exp / "data" / "selection.json").exists()
    assert list((exp / "samples").iterdir()) == [exp / "samples" / "sample"]
    assert (exp / "artifacts" / "evaluate" / "evaluation.jsonl").exists()
    assert (exp / "artifacts" / "prepare" / "demo.csv.gz").exists() and (exp / "plots" / "loss.png").exists()
    plan = json.loads((exp / "plan.json").read_text())
    assert plan["name"] == "tiny" and plan["smoke"] is True
    assert plan["stages"][2]["params"]["model"] == "ckpts/best.pt"  # with the kinds' defaults filled in
    env = json.loads((exp / "env.json").read_text())
    assert env["packages"]["infra"] and env["python"]["version"] and "devices" in env
    assert "$ " in (exp / "logs" / "train.log").read_text()
    assert any('"type":"metric"' in line for line in (exp / "metrics" / "train.jsonl").read_text().splitlines())
    listed = {a.path for a in ExperimentLayout(exp).list_artifacts()}
    assert {"plan.json", "env.json", "ckpts/best.pt", "data/selection.json", "logs/train.log"} <= listed
    assert not any(path.startswith("work/") for path in listed)
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_a_train_stage_of_two_processes_runs_as_two_ranks_and_writes_one_checkpoint(tmp_path: Path) -> None:
    """``"processes": 2`` on the CPU: torchrun with gloo, rank 0 alone writing checkpoints and events."""
    started = time.monotonic()
    plan = {
        **DEMO,
        "name": "ranks",
        "stages": [*DEMO["stages"][:1], {**DEMO["stages"][1], "resources": {"processes": 2}}],
    }
    result = _infra_train(tmp_path, plan, "--experiment", "ranks", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr
    exp = tmp_path / "w" / "experiments" / "ranks"
    log = (exp / "logs" / "train.log").read_text()
    assert "-m torch.distributed.run --standalone --nproc-per-node 2 -m crystallm_core.cli train" in log
    assert "rank 0 of 2" in log and "rank 1 of 2" not in log  # rank 0 alone prints
    assert {p.name for p in (exp / "ckpts").iterdir()} == {"last.pt", "best.pt"}
    assert not list(exp.rglob("*.pt.*")) and sorted(p.name for p in exp.rglob("*.pt")) == ["best.pt", "last.pt"]
    events = [json.loads(line) for line in (exp / "metrics" / "train.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["type"] == "metric" and "loss" in e["values"]]
    assert steps and len(steps) == len(set(steps))  # each step's metrics once, not once per rank
    assert [e["seq"] for e in events] == sorted({e["seq"] for e in events})  # one writer
    assert json.loads((exp / "plan.json").read_text())["stages"][1]["resources"]["processes"] == 2
    assert time.monotonic() - started < 90


def test_infra_train_retries_within_the_budget_of_each_failure_class() -> None:
    """The classes a local run sees: the stage's own error (budget ``error``) and the platform's (``infra``)."""
    from dataclasses import dataclass

    from infra.local import failure_class

    @dataclass
    class R:
        failure_class: object = None

    assert [failure_class(R(v)) for v in (None, 0, 4, 5, "infra", "FAILURE_INFRA", "preempted", "nonsense")] == [
        "error",
        "error",
        "error",
        "infra",
        "infra",
        "infra",
        "preempted",
        "error",
    ]
