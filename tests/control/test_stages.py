"""Built-in stage kinds: the command lines they build and where, in the experiment layout, they write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from crystallm_core import layout
from infra.node.runner import stage_context
from infra.spec import stages
from infra.spec.stages import Command, get_stage_kind

EXP = Path("/w/experiments/e")


def _build(kind: str, params: dict, stage: str = "s", smoke: bool = False) -> tuple[Command, object]:
    k = get_stage_kind(kind)
    p = k.params.model_validate(params)
    return k.build(p, stage_context(EXP, stage, smoke)), p


def _argv(command: Command, i: int = 0) -> list[str]:
    assert command.steps[i][:3] == [sys.executable, "-m", "crystallm_core.cli"]
    return command.steps[i][3:]


def test_stage_contexts_use_the_layout_s_paths() -> None:
    ctx, lay = stage_context(EXP, "s"), layout.ExperimentLayout(EXP)
    assert (ctx.work_dir, ctx.data_dir, ctx.ckpts_dir) == (lay.work_dir("s"), lay.data_dir, lay.ckpts_dir)
    assert (ctx.samples_dir, ctx.artifacts_dir) == (lay.samples_dir("s"), lay.artifacts_dir / "s")
    assert (stages.DATA, stages.CKPTS, stages.PROBES) == (layout.DATA, layout.CKPTS, layout.PROBES)
    assert ctx.rel(ctx.samples_dir) == "samples/s"


def test_prepare_writes_data_and_keeps_the_demo_set_in_artifacts() -> None:
    command, _ = _build("prepare", {"demo": {"n": 5}, "inputs": ["/in.csv"]}, "prep", smoke=True)
    demo = str(EXP / "artifacts" / "prep" / "demo.csv.gz")
    assert _argv(command, 0)[:3] == ["demo-data", "--out", demo]
    assert _argv(command, 1) == ["prepare", "/in.csv", demo, "--out", str(EXP / "data"), "--decimals", "4", "--smoke"]
    assert _argv(command, 0)[3:] == ["--n", "5", "--seed", "0"]
    command, _ = _build("prepare", {"demo": {"n": 5, "prototypes": ["rocksalt", "cscl"]}}, "prep")
    assert _argv(command, 0)[3:] == ["--n", "5", "--seed", "0", "--prototypes", "rocksalt,cscl"]
    assert command.outputs == ["data", "artifacts/prep"]
    assert "--smoke" not in _argv(_build("prepare", {"inputs": ["/in.csv"]})[0])


def test_prepare_passes_augment_within_its_bound() -> None:
    from crystallm_core.augment import AUGMENT_MAX  # the spec's bound must be the core's

    argv = _argv(_build("prepare", {"inputs": ["/in.csv"], "augment": AUGMENT_MAX, "seed": 3})[0])
    assert argv[-4:] == ["--seed", "3", "--augment", str(AUGMENT_MAX)]
    assert "--augment" not in _argv(_build("prepare", {"inputs": ["/in.csv"]})[0])
    with pytest.raises(ValueError, match="augment"):
        _build("prepare", {"inputs": ["/in.csv"], "augment": AUGMENT_MAX + 1})


def test_sample_benchmark_and_mcts_write_samples_of_their_stage_from_the_best_checkpoint() -> None:
    sample, _ = _build("sample", {"prompt": "NaCl"}, "gen")
    bench, _ = _build("benchmark", {"test": "/t.csv"}, "csp")
    for command, stage in ((sample, "gen"), (bench, "csp")):
        argv = _argv(command)
        assert argv[argv.index("--model") + 1] == str(EXP / "ckpts" / "best.pt")
        assert argv[argv.index("--out") + 1] == str(EXP / "samples" / stage)
        assert command.outputs == [f"samples/{stage}"]
    options = {"address": "tcp://127.0.0.1:5555", "timeout": "5"}
    mcts, p = _build("mcts", {"prompt": "NaCl", "scorer": "zmq", "scorer_options": options, "max_nodes": 500}, "m")
    argv = _argv(mcts)
    assert argv[argv.index("--out") + 1] == str(EXP / "samples" / "m") and "--smoke" not in argv
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--scorer-option"] == [
        "address=tcp://127.0.0.1:5555",
        "timeout=5",
    ]
    assert argv[argv.index("--max-nodes") + 1] == "500" and "--no-pipeline" not in argv
    unpiped, _ = _build("mcts", {"prompt": "NaCl", "scorer": "zmq", "pipeline": False}, "m")
    assert "--no-pipeline" in _argv(unpiped)
    assert get_stage_kind("mcts").extras(p) == {"scorer:zmq"}
    _, chgnet = _build("mcts", {"prompt": "NaCl", "scorer": "chgnet"})
    assert get_stage_kind("mcts").extras(chgnet) == {"scorer:chgnet", "chgnet"}  # the scorer and its package


def test_evaluate_writes_its_results_into_artifacts_and_takes_smoke() -> None:
    command, _ = _build("evaluate", {"inputs": ["samples/gen"], "workers": 2}, "ev", smoke=True)
    out = str(EXP / "artifacts" / "ev" / "evaluation.jsonl")
    assert _argv(command) == [
        "evaluate",
        str(EXP / "samples" / "gen"),
        "--json",
        "--out",
        out,
        "--workers",
        "2",
        "--smoke",
    ]
    assert command.outputs == ["artifacts/ev"]


def test_analyze_and_plot_read_the_experiment_root() -> None:
    command, p = _build("analyze", {"probe": "blocks", "pairs": "all", "top_n": 2}, smoke=True)
    assert _argv(command) == [
        "probes",
        "analyze",
        str(EXP),
        "--probe",
        "blocks",
        "--pairs",
        "all",
        "--top-n",
        "2",
        "--smoke",
    ]
    assert get_stage_kind("analyze").extras(p) == {"oid"}  # placed only where omegaid is installed
    assert _argv(_build("plot", {}, smoke=True)[0]) == ["plot", str(EXP)]  # plot has no smoke mode
    with pytest.raises(ValueError, match="probe"):
        _build("analyze", {"probe": "a/b"})


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "a/./b"])
def test_a_command_s_outputs_stay_in_the_experiment(bad: str) -> None:
    with pytest.raises(ValueError):
        Command([["true"]], outputs=[bad])


def test_train_runs_under_torchrun_when_its_world_size_is_above_one() -> None:
    kind = get_stage_kind("train")
    params = kind.params.model_validate({"model": "tiny"})
    (one,) = kind.build(params, stage_context(EXP, "train")).steps
    (two,) = kind.build(params, stage_context(EXP, "train", processes=2)).steps
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert two == launcher + one[2:]  # the same crystallm_core.cli train line, launched as two ranks
    with_config = kind.params.model_validate({"config": "/c.yaml"})
    (argv,) = kind.build(with_config, stage_context(EXP, "train", processes=8)).steps
    assert argv[:7] == [*launcher[:5], "8", "-m"] and argv[7:10] == ["crystallm_core.cli", "train", "/c.yaml"]
    # other kinds run one process whatever the world size
    sample = get_stage_kind("sample")
    (argv,) = sample.build(sample.params.model_validate({"prompt": "NaCl"}), stage_context(EXP, "s", processes=2)).steps
    assert argv[:3] == [sys.executable, "-m", "crystallm_core.cli"]
    assert stages.world_size(stages.Resources(gpus=4, processes=1)) == 4
    assert stages.world_size(stages.Resources(gpus=1, processes=1)) == 1
    assert stages.world_size(stages.Resources(gpus=0, processes=3)) == 3


def test_shard_stages_run_their_part_and_the_merge_writes_where_the_whole_stage_would() -> None:
    part = {"index": 1, "count": 3}
    for kind, params in (
        ("sample", {"prompt": "NaCl"}),
        ("benchmark", {"test": "/t.csv"}),
        ("evaluate", {"inputs": ["x"]}),
    ):
        argv = _argv(_build(kind, {**params, "shard": part}, "g.shard-1-of-3")[0])
        assert argv[argv.index("--shard") + 1] == "1/3"
        assert "--shard" not in _argv(_build(kind, params)[0])
    parts = ["g.shard-0-of-2", "g.shard-1-of-2"]
    merge, _ = _build("merge", {"of": "csp", "parts": parts}, "g")
    assert _argv(merge) == ["merge", "csp", *(str(EXP / "samples" / p) for p in parts), "--out", str(EXP / "samples/g")]
    assert merge.outputs == ["samples/g"]
    merge, _ = _build("merge", {"of": "evaluate", "parts": parts}, "g")
    jsonl = [str(EXP / "artifacts" / p / "evaluation.jsonl") for p in parts]
    assert _argv(merge) == ["merge", "evaluate", *jsonl, "--out", str(EXP / "artifacts/g/evaluation.jsonl")]
    assert merge.outputs == ["artifacts/g"]


def test_a_benchmark_reads_a_test_file_or_a_split_of_the_experiment_s_data_set() -> None:
    bench, _ = _build("benchmark", {"test_split": "test"}, "csp")
    argv = _argv(bench)
    assert argv[argv.index("--test") + 1 :][:3] == [str(EXP / "data"), "--test-split", "test"]
    with pytest.raises(ValueError, match="missing test: give test .* or test_split"):
        _build("benchmark", {})
    with pytest.raises(ValueError, match="or test_split .*, not both"):
        _build("benchmark", {"test": "/t.csv", "test_split": "test"})
    with pytest.raises(ValueError, match="test_split"):
        _build("benchmark", {"test_split": "holdout"})
