"""Smoke mode: every stage verb takes --smoke and runs its usual code path with tiny limits."""

import csv
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PEROV_TEST, PEROV_VAL, ROOT

from crystallm_core.cli import build_parser, main
from crystallm_core.store import Store
from crystallm_core.tokens import read_meta

STAGE_VERBS = {
    "prepare": ["prepare", "in.csv", "--out", "d"],
    "evaluate": ["evaluate", "x.cif"],
    "train": ["train", "c.yaml"],
    "sample": ["sample", "--model", "m.pt", "--prompt", "NaCl", "--out", "o"],
    "benchmark": ["benchmark", "csp", "--model", "m.pt", "--test", "t.csv"],
    "probes": ["probes", "analyze", "run"],
}


@pytest.mark.parametrize("verb", STAGE_VERBS)
def test_every_stage_verb_takes_smoke(verb):
    argv = STAGE_VERBS[verb]
    assert build_parser(verb).parse_args([*argv, "--smoke"]).smoke is True
    assert build_parser(verb).parse_args(argv).smoke is False


def test_prepare_smoke_reads_the_first_64_structures(tmp_path, capsys):
    if not PEROV_TEST.exists():
        pytest.skip(f"{PEROV_TEST} is missing: the shared data sets live beside the checkout in ../shared/data")
    assert main(["prepare", str(PEROV_TEST), "--out", str(tmp_path / "data"), "--workers", "1", "--smoke"]) == 0
    meta = read_meta(tmp_path / "data")
    assert meta["counts"]["read"] == 64 and meta["limit"] == 64
    assert "only the first 64 structures" in capsys.readouterr().out
    with gzip.open(PEROV_TEST, "rt", newline="") as fh:
        first = [row["material_id"] for _, row in zip(range(64), csv.DictReader(fh))]
    with Store.open(tmp_path / "data" / "structures.sqlite") as store:
        assert sorted(store.ids()) == sorted(first)


def test_evaluate_smoke_checks_the_first_64_inputs(tmp_path, perov_rows, capsys):
    path = tmp_path / "cifs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "cif"])
        for i, row in enumerate(perov_rows[:70]):
            w.writerow([f"s{i}", row["cif"]])
    assert main(["evaluate", str(path), "--json", "--workers", "1", "--smoke"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 64
    assert main(["evaluate", str(path), "--json", "--workers", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 70


def test_benchmark_smoke_caps_structures_attempts_and_tokens(monkeypatch, capsys):
    """The model and the sampler are stood in for: what matters is what the benchmark asks of them."""
    if not PEROV_TEST.exists():
        pytest.skip(f"{PEROV_TEST} is missing: the shared data sets live beside the checkout in ../shared/data")
    import crystallm_core.sample as sample
    import crystallm_core.sampler as sampler

    asked = []
    model = SimpleNamespace(cfg=SimpleNamespace(block_size=1024), parameters=lambda: iter([torch.zeros(1)]))
    monkeypatch.setattr(sample, "load_for_inference", lambda path, device: (model, None, {}))
    monkeypatch.setattr(sampler, "Sampler", lambda *a, **k: None)

    def generate(_sampler, prompts, n, params, on_progress=None, first_prompt=0):
        asked.append((len(prompts), n, params.max_tokens))
        samples = [sample.Sample(f"{c}-{i}-{j}", c, j, "", "") for i, (c, _) in enumerate(prompts) for j in range(n)]
        return samples, SimpleNamespace(samples_per_s=1.0)

    monkeypatch.setattr(sample, "generate", generate)
    args = ["benchmark", "csp", "--model", "m.pt", "--test", str(PEROV_TEST), "--workers", "1"]
    assert main([*args, "--limit", "3", "--n", "5"]) == 0
    assert main([*args, "--smoke"]) == 0
    assert asked == [(3, 5, 1024), (8, 2, 64)]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["attempts"] == 16


def _smoke_gaps(plan: dict) -> list[str]:
    """Stage verbs of the plan that infra/stages.py runs without --smoke although the plan asks for it."""
    from infra.node.runner import stage_context
    from infra.spec.stages import get_stage_kind

    gaps = []
    for stage in plan["stages"]:
        kind = get_stage_kind(stage["kind"])
        command = kind.build(kind.params.model_validate(stage["params"]), stage_context(Path("/e"), "s", True))
        for argv in command.steps:
            verb = argv[3] if argv[1:3] == ["-m", "crystallm_core.cli"] else None
            if verb in STAGE_VERBS and "--smoke" not in argv:
                gaps.append(f"{stage['name']} (crystallm {verb})")
    return gaps


@pytest.mark.slow
def test_perov5_example_plan_runs_end_to_end_in_smoke_mode(tmp_path):
    """examples/perov5.json, a one-GPU plan, through ``infra-train --smoke`` on this CPU, in under a minute."""
    for path in (PEROV_VAL, PEROV_TEST):
        if not path.exists():
            pytest.skip(f"{path} is missing: the shared data sets live beside the checkout in ../shared/data")
    plan = json.loads((ROOT / "examples" / "perov5.json").read_text())
    expected = ["prepare", "train", "analyze", "benchmark", "evaluate"]
    if importlib.util.find_spec("omegaid") is None:  # Python < 3.12: no ΦID, so no analyze stage
        plan["stages"] = [s for s in plan["stages"] if s["kind"] != "analyze"]
        expected.remove("analyze")
    assert plan["smoke"] is False and plan["stages"][1]["resources"]["gpus"] == 1  # --smoke overrides both
    assert _smoke_gaps(plan) == []  # else prepare alone would canonicalize all 3,787 perov_5 structures
    plan_path = tmp_path / "perov5-smoke.json"
    plan_path.write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("CRYSTALLM_EVENTS", "INFRA_STAGE_MODULES")}
    env["INFRA_CONFIG_DIR"] = str(tmp_path / "config")
    env["OMP_NUM_THREADS"] = "1"  # CI machines are small and shared: extra intra-op threads only oversubscribe
    work = tmp_path / "work"
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.local",
            str(plan_path),
            "--workdir",
            str(work),
            "--experiment",
            "smoke",
            "--quiet",
            "--smoke",
        ],
        cwd=ROOT,  # the plan's input paths are relative to the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    states = dict(re.findall(r"^\s+(\S+)\s+(succeeded|failed|skipped|cancelled)\b", done.stdout, re.M))
    assert states == dict.fromkeys(expected, "succeeded"), done.stdout + done.stderr
    assert done.returncode == 0
    exp = work / "experiments" / "smoke"
    assert json.loads((exp / "data" / "selection.json").read_text())["limit"] == 64
    assert (exp / "ckpts" / "best.pt").exists() and (exp / "plots" / "loss.png").exists()
    assert sorted(p.name for p in (exp / "probes" / "blocks").iterdir()) == ["eval_2.pt.gz", "eval_4.pt.gz"]
    if "analyze" in expected:
        assert (exp / "plots" / "blocks" / "phiid.json").exists()
    assert json.loads((exp / "samples" / "benchmark" / "csp.json").read_text())["attempts"] == 16
    assert (exp / "artifacts" / "evaluate" / "evaluation.jsonl").exists()
    assert all((exp / "logs" / f"{s}.log").exists() for s in states)
    assert seconds < 60, f"the smoke run took {seconds:.0f} s"
