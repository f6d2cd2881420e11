"""Plan validation: every problem named by its field path, all at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infra.spec.plan import (
    PlanError,
    force_smoke,
    load_plan_data,
    parse_memory,
    parse_plan_text,
    resolve_inputs,
    validate_plan,
    with_defaults,
)

ROOT = Path(__file__).resolve().parents[2]


def _plan(*stages: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"name": "p", **top, "stages": list(stages)}


PREP = {"name": "prep", "kind": "prepare", "params": {"demo": {"n": 5}}}


def _errors(data: Any, known: set[str] | None = None) -> list[str]:
    with pytest.raises(PlanError) as err:
        validate_plan(data, known)
    return [str(i) for i in err.value.issues]


def test_a_valid_plan_is_normalised() -> None:
    plan = validate_plan(
        _plan(
            PREP,
            {
                "name": "ev",
                "kind": "evaluate",
                "after": ["prep"],
                "params": {"inputs": ["./prep/x/../raw.csv.gz"]},
                "resources": {"memory": "512MiB"},
                "max_retries": 2,
            },
            resources={"gpus": 0, "cpus": 0.5, "memory": "4GiB"},
            priority=3,
        )
    )
    ev = plan.stages[1]
    assert ev.params == {"inputs": ["prep/raw.csv.gz"]}
    assert (ev.resources.gpus, ev.resources.cpus, ev.resources.memory_mib) == (0, 0.5, 512)
    assert plan.stages[0].resources.memory_mib == 4096 and ev.max_retries == 2 and plan.priority == 3
    assert [s.name for s in plan.order()] == ["prep", "ev"]


def test_unknown_kind() -> None:
    errors = _errors(_plan(PREP, {"name": "t", "kind": "trian"}))
    assert errors == [
        "stages[1].kind: unknown stage kind 'trian'; known: analyze, benchmark, evaluate, mcts, merge, plot, prepare, "
        "sample, train"
    ]


def test_kinds_that_nodes_advertise_are_accepted_with_params_unchecked() -> None:
    plan = validate_plan(_plan({"name": "x", "kind": "relax", "params": {"anything": 1}}), known_kinds={"relax"})
    assert plan.stages[0].params == {"anything": 1}


def test_missing_fields() -> None:
    errors = _errors({"stages": [{"kind": "prepare", "params": {"demo": {}}}, {"name": "t", "kind": "benchmark"}]})
    assert "name: missing required field" in errors
    assert "stages[0].name: missing required field" in errors
    assert (
        "stages[1].params: missing test: give test (a file of test structures) or test_split (a split of data/)"
        in errors
    )


def _layout_entries() -> list[str]:
    from crystallm_core.layout import RESERVED_NAMES

    return sorted(RESERVED_NAMES)


@pytest.mark.parametrize("name", _layout_entries())
def test_stage_names_like_the_layout_s_top_level_entries_are_fine(name: str) -> None:
    """Every per-stage path nests under a folder (logs/, work/, samples/, ...), so no stage name collides with
    a top-level entry of the experiment record: the plan needs no copy of the layout's names."""
    plan = validate_plan(
        _plan(PREP, {"name": name, "kind": "evaluate", "after": ["prep"], "params": {"inputs": ["x"]}})
    )
    assert [s.name for s in plan.stages] == ["prep", name]


def test_an_experiment_holds_one_stage_per_experiment_wide_folder() -> None:
    train = {"name": "t1", "kind": "train", "after": ["prep"], "params": {"model": "tiny"}}
    errors = _errors(_plan(PREP, train, {**train, "name": "t2"}, {**PREP, "name": "prep2"}))
    assert errors == [
        "stages[2].kind: stage 't2' would write ckpts/, probes/ of the experiment, as stage 't1' (stages[1]) does; "
        "an experiment holds one 'train' stage (split the work into two experiments)",
        "stages[3].kind: stage 'prep2' would write data/ of the experiment, as stage 'prep' (stages[0]) does; "
        "an experiment holds one 'prepare' stage (split the work into two experiments)",
    ]


def test_plan_json_gets_the_defaults_of_every_known_kind() -> None:
    plan = validate_plan(
        _plan(PREP, {"name": "t", "kind": "train", "after": ["prep"]}, {"name": "x", "kind": "relax"}),
        known_kinds={"relax"},
    )
    full = with_defaults(plan.to_dict())
    assert full["stages"][1]["params"]["data_dir"] == "data" and full["stages"][1]["params"]["resume"] is False
    assert (
        full["stages"][0]["params"]["demo"] == {"n": 5, "seed": 0, "prototypes": None}
        and full["stages"][2]["params"] == {}
    )
    assert plan.to_dict()["stages"][1]["params"] == {}  # what the master stores stays as submitted


def test_cycle_is_named() -> None:
    errors = _errors(
        _plan(
            {**PREP, "after": ["c"]},
            {"name": "b", "kind": "evaluate", "after": ["prep"], "params": {"inputs": ["x"]}},
            {"name": "c", "kind": "evaluate", "after": ["b"], "params": {"inputs": ["x"]}},
        )
    )
    assert errors == ["stages[0].after: dependency cycle: prep -> c -> b -> prep"]


def test_negative_gpus() -> None:
    errors = _errors(_plan({**PREP, "resources": {"gpus": -1}}, resources={"gpus": -2}))
    assert errors == [
        "resources.gpus: Input should be greater than or equal to 0",
        "stages[0].resources.gpus: Input should be greater than or equal to 0",
    ]


@pytest.mark.parametrize("path", ["../other/train", "train/../../x", "/etc/passwd", "~/x", "."])
def test_artifact_paths_may_not_leave_the_experiment(path: str) -> None:
    errors = _errors(_plan({"name": "s", "kind": "sample", "params": {"model": path, "prompt": "NaCl"}}))
    assert len(errors) == 1 and errors[0].startswith(f"stages[0].params.model: path {path!r}")


def test_all_errors_at_once_with_field_paths() -> None:
    errors = _errors(
        _plan(
            PREP,
            {"name": "prep", "kind": "prepare", "params": {"inputs": ["a.csv"], "splt": [1, 0, 0]}},
            {
                "name": "t",
                "kind": "train",
                "after": ["prep", "trian"],
                "params": {"data_dir": "prep/data"},
                "resources": {"memory": "4GB"},
                "retry": 1,
            },
            smoke="yes",
        )
    )
    assert errors == [
        "smoke: Input should be a valid boolean",
        "stages[1].name: duplicate stage name 'prep' (also stages[0])",
        "stages[1].params.splt: unknown field (not allowed here)",
        "stages[2].after[1]: unknown stage 'trian'",
        'stages[2].resources.memory: invalid memory size \'4GB\'; use e.g. "4GiB", "512MiB" or a whole number of MiB',
        "stages[2].retry: unknown field (not allowed here)",
    ]


def test_kind_level_rules() -> None:
    errors = _errors(
        _plan({"name": "s", "kind": "sample", "params": {"model": "t/m.pt"}}, {"name": "p", "kind": "prepare"})
    )
    assert errors == [
        "stages[0].params: give exactly one of 'prompt' (a formula) and 'prompts' (a file)",
        "stages[1].params: give 'inputs' (structure files) or 'demo' ({n, seed}) or both",
    ]


def test_json_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"name": "x",\n "stages": [}\n')
    with pytest.raises(PlanError) as err:
        load_plan_data(path)
    assert str(err.value.issues[0]).startswith(f"{path} line 2 column 13: invalid JSON")


def test_memory_sizes() -> None:
    assert [parse_memory(v) for v in ("4GiB", "512MiB", "1.5GiB", 100, "1TiB")] == [4096, 512, 1536, 100, 1 << 20]
    for bad in ("4GB", "-1MiB", True, -5, "lots"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_relative_inputs_are_made_absolute_on_submit(tmp_path: Path) -> None:
    data = _plan(
        {"name": "p", "kind": "prepare", "params": {"inputs": ["data/a.csv", "/abs/b.csv"]}},
        {"name": "b", "kind": "benchmark", "params": {"model": "p/m.pt", "test": "t.csv"}},
    )
    out = resolve_inputs(data, tmp_path)
    assert out["stages"][0]["params"]["inputs"] == [str(tmp_path / "data/a.csv"), "/abs/b.csv"]
    assert out["stages"][1]["params"]["test"] == str(tmp_path / "t.csv")
    assert out["stages"][1]["params"]["model"] == "p/m.pt"  # experiment artifacts stay relative
    assert data["stages"][0]["params"]["inputs"][0] == "data/a.csv"  # the input is not modified


def test_examples_validate_and_the_demo_plan_is_the_example() -> None:
    from infra.demo import DEMO_PLAN

    for name in ("demo.json", "perov5.json", "perov5_ddp.json", "perov5_2nodes.json", "carbon24.json"):
        validate_plan(resolve_inputs(load_plan_data(ROOT / "examples" / name), ROOT))
    ddp = validate_plan(load_plan_data(ROOT / "examples" / "perov5_ddp.json")).stages[1].resources
    gang = validate_plan(load_plan_data(ROOT / "examples" / "perov5_2nodes.json")).stages[1].resources
    assert (ddp.gpus, ddp.nodes, gang.gpus, gang.nodes) == (2, 1, 1, 2)
    assert json.loads((ROOT / "examples" / "demo.json").read_text()) == DEMO_PLAN


def test_the_demo_runs_what_the_installation_offers() -> None:
    from infra.demo import DEMO_PLAN, demo_plan

    full, note = demo_plan({"prepare", "train", "sample", "evaluate", "mcts"})
    assert full is DEMO_PLAN and note == ""
    reduced, note = demo_plan({"prepare", "evaluate"})
    assert [s.name for s in validate_plan(reduced).stages] == ["prepare", "evaluate"]
    assert "lacks stage kind(s) sample, train" in note


def test_the_demo_reports_its_valid_rate_from_the_evaluate_stage() -> None:
    from rich.console import Console

    from infra.demo import _show, validity

    evaluate = [{"step": 0, "values": {"is_valid_rate": 0.75, "count": 16, "sensible_rate": 1.0}}]
    assert validity({"train": [{"step": 9, "values": {"val_loss": 1.0}}], "evaluate": evaluate}) == {
        "valid": 12,
        "count": 16,
        "rate": 0.75,
    }
    assert validity({"evaluate": []}) is None and validity({}) is None
    console = Console(record=True, width=200)
    exp = {"experiment": "demo-1", "state": "succeeded", "stages": []}
    _show(
        console,
        {
            "experiment": exp,
            "metrics": {},
            "artifacts": [],
            "seconds": 61,
            "validity": validity({"evaluate": evaluate}),
        },
        as_json=False,
    )
    assert console.export_text().splitlines()[-1].startswith("valid: 12 of 16 evaluated structures (75%)")


# --- numbers, encodings, duplicate keys (issue 14) --------------------------------------------------------


@pytest.mark.parametrize(
    ("top", "path"),
    [
        ({"priority": 2**31}, "priority"),
        ({"priority": 2**63}, "priority"),
        ({"priority": -(2**31)}, "priority"),
        ({"resources": {"gpus": 2**32}}, "resources.gpus"),
        ({"resources": {"cpus": 1e300}}, "resources.cpus"),
        ({"resources": {"memory": 2**32}}, "resources.memory"),
        ({"resources": {"memory": "9" * 400 + "TiB"}}, "resources.memory"),
        ({"resources": {"memory": "5000000TiB"}}, "resources.memory"),
        ({"resources": {"processes": 0}}, "resources.processes"),
        ({"resources": {"processes": 1025}}, "resources.processes"),
        ({"resources": {"processes": 2**32}}, "resources.processes"),
        ({"resources": {"processes": 2.0}}, "resources.processes"),
        ({"resources": {"processes": True}}, "resources.processes"),
    ],
)
def test_every_number_of_a_plan_is_bounded_and_named(top: dict[str, Any], path: str) -> None:
    errors = _errors(_plan(PREP, **top))
    assert len(errors) == 1 and errors[0].startswith(f"{path}: "), errors


def test_numbers_in_stage_params_are_bounded_by_their_kind() -> None:
    huge = 2**63
    stages = [
        {"name": "prep", "kind": "prepare", "params": {"demo": {"n": huge, "seed": -1}, "workers": 10**6}},
        {"name": "t", "kind": "train", "params": {"max_steps": huge, "batch_size": 2**31, "overrides": {"x": 2**64}}},
        {"name": "s", "kind": "sample", "params": {"prompt": "NaCl", "num_samples": huge, "seed": 2**32}},
        {"name": "m", "kind": "mcts", "params": {"prompt": "NaCl", "scorer": "random", "iterations": huge}},
        {"name": "b", "kind": "benchmark", "params": {"test": "/t.csv", "n": huge, "temperature": 1e300}},
    ]
    paths = {e.split(": ")[0] for e in _errors(_plan(*stages))}
    assert {
        "stages[0].params.demo.n",
        "stages[0].params.demo.seed",
        "stages[0].params.workers",
        "stages[1].params.max_steps",
        "stages[1].params.batch_size",
        "stages[2].params.num_samples",
        "stages[2].params.seed",
        "stages[3].params.iterations",
        "stages[4].params.n",
        "stages[4].params.temperature",
    } <= paths
    assert any(p.startswith("stages[1].params.overrides.x") for p in paths)


def _text_errors(text: str) -> list[str]:
    with pytest.raises(PlanError) as err:
        parse_plan_text(text)
    return [str(i) for i in err.value.issues]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_with_their_field_path(literal: str) -> None:
    text = '{"name": "p", "resources": {"cpus": ' + literal + '}, "stages": [{"name": "a", "kind": "plot"}]}'
    errors = _text_errors(text)
    assert len(errors) == 1 and errors[0].startswith("resources.cpus: ") and "finite" in errors[0], errors
    # a plan built in Python (never parsed) gets the same answer from validation
    assert _errors({"name": "p", "resources": {"cpus": float("inf")}, "stages": [{"name": "a", "kind": "plot"}]})


def test_a_huge_integer_literal_is_named_not_an_exception() -> None:
    errors = _text_errors('{"name": "p", "priority": ' + "9" * 5000 + ', "stages": []}')
    assert errors == ["priority: integer of 5000 digits is far out of range"]


def test_duplicate_keys_are_refused_with_their_path() -> None:
    text = '{"name": "p", "stages": [{"name": "a", "kind": "plot", "params": {}, "kind": "train"}], "name": "q"}'
    assert _text_errors(text) == [
        "name: duplicate key 'name': an object may give a key once (JSON readers would keep only one of its values)",
        "stages[0].kind: duplicate key 'kind': an object may give a key once (JSON readers would keep only one of "
        "its values)",
    ]


def test_strings_that_cannot_be_stored_are_refused() -> None:
    errors = _text_errors('{"name": "p", "stages": [{"name": "a", "kind": "x", "params": {"s": "a\\u0000b"}}]}')
    assert errors == ["stages[0].params.s: string contains a NUL character (at 1)"]
    errors = _text_errors('{"name": "p", "stages": [{"name": "a", "kind": "x", "params": {"s": "\\ud800"}}]}')
    assert errors == ["stages[0].params.s: string is not valid Unicode: a lone surrogate '\\ud800' at character 0"]


def test_a_plan_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes('{"name": "caf\u00e9", "stages": []}'.encode("latin-1"))
    with pytest.raises(PlanError) as err:
        load_plan_data(path)
    assert [str(i) for i in err.value.issues] == [
        f"{path}: not UTF-8 text: byte 0xe9 at offset 13 (invalid continuation byte); save the plan as UTF-8"
    ]
    path.write_bytes(b'\xef\xbb\xbf{"name": "bom", "stages": []}')  # a byte-order mark is fine
    assert load_plan_data(path) == {"name": "bom", "stages": []}


# --- several processes of one stage (issue 16) -------------------------------------------------------------

TRAIN = {"name": "t", "kind": "train", "params": {"model": "tiny"}}


def test_processes_default_to_one_and_reach_only_train_stages() -> None:
    plan = validate_plan(_plan(PREP, TRAIN, resources={"gpus": 0, "processes": 1024}))
    prep, train = plan.stages
    assert (prep.resources.processes, train.resources.processes) == (1, 1024)  # prepare runs one process
    assert plan.to_dict()["stages"][1]["resources"]["processes"] == 1024  # the node reads it from here
    assert validate_plan(_plan(TRAIN)).stages[0].resources.processes == 1
    four = validate_plan(_plan({**TRAIN, "resources": {"gpus": 4, "processes": 4}})).stages[0].resources
    assert (four.gpus, four.processes) == (4, 4)


def test_processes_are_refused_where_they_cannot_run() -> None:
    errors = _errors(_plan({**PREP, "resources": {"processes": 2}}, {**TRAIN, "resources": {"processes": 2}}))
    assert errors == [
        "stages[0].resources.processes: kind 'prepare' runs one process; only train runs several",
        "stages[1].resources.processes: 2 processes with 1 GPU(s): a stage runs one process per GPU; "
        "give gpus 0 (CPU processes) or gpus 2",  # train's default is 1 GPU
    ]
    assert _errors(_plan({**TRAIN, "resources": {"gpus": 4, "processes": 2}})) == [
        "stages[0].resources.processes: 2 processes with 4 GPU(s): a stage runs one process per GPU; "
        "give gpus 0 (CPU processes) or gpus 2"
    ]
    assert _errors(_plan(TRAIN, resources={"processes": 2})) == [  # the plan's default, named where given
        "resources.processes: 2 processes with 1 GPU(s): a stage runs one process per GPU; "
        "give gpus 0 (CPU processes) or gpus 2"
    ]
    # a plugin kind the master does not know is passed on as given
    plan = validate_plan(_plan({"name": "x", "kind": "relax", "resources": {"processes": 3}}), {"relax"})
    assert plan.stages[0].resources.processes == 3


def test_grad_accum_must_be_a_multiple_of_the_world_size() -> None:
    def train(accum: object, **resources: int) -> dict[str, Any]:
        return {**TRAIN, "params": {"overrides": {"grad_accum": accum}}, "resources": resources}

    errors = _errors(_plan(train(3, gpus=0, processes=2)))
    assert errors == [
        "stages[0].params.overrides.grad_accum: grad_accum 3 counts micro-batches over all 2 processes and "
        "must be a multiple of 2"
    ]
    assert _errors(_plan(train(2, gpus=4)))[0].startswith("stages[0].params.overrides.grad_accum: grad_accum 2 ")
    validate_plan(_plan(train(4, gpus=0, processes=2)))
    validate_plan(_plan(train(3, gpus=0, processes=2), smoke=True))  # smoke runs one micro-batch per rank
    validate_plan(_plan(train(3, gpus=1)))


def test_a_smoke_plan_asks_for_no_gpu_and_keeps_its_world_size() -> None:
    """Smoke mode runs anywhere: resolution drops the GPUs, so the master and infra-train place it on a CPU."""
    example = load_plan_data(ROOT / "examples" / "perov5.json")
    assert validate_plan(example).stages[1].resources.gpus == 1
    smoke = validate_plan(force_smoke(example))
    assert smoke.smoke and [s.resources.gpus for s in smoke.stages] == [0] * len(smoke.stages)
    assert smoke.to_dict()["stages"][1]["resources"]["gpus"] == 0  # what the master stores and schedules
    four = validate_plan(_plan({**TRAIN, "resources": {"gpus": 4}}, PREP, smoke=True)).stages
    assert (four[0].resources.gpus, four[0].resources.processes) == (0, 4)  # four CPU ranks rehearse DDP
    assert (four[1].resources.gpus, four[1].resources.processes) == (0, 1)
    # checked as the real run would be: smoke does not hide a plan that cannot run on its GPUs
    assert _errors(_plan({**TRAIN, "resources": {"gpus": 4, "processes": 2}}, smoke=True)) == [
        "stages[0].resources.processes: 2 processes with 4 GPU(s): a stage runs one process per GPU; "
        "give gpus 0 (CPU processes) or gpus 2"
    ]
    assert force_smoke(["not", "a", "plan"]) == ["not", "a", "plan"]


def _sharded(kind: str = "benchmark", params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": "csp", "kind": kind, "params": params or {"test": "/t.csv", "seed": 3}, "after": ["prep"], **extra}


def test_a_sharded_stage_becomes_its_parts_and_a_merge_under_its_name() -> None:
    evaluate = {"name": "ev", "kind": "evaluate", "params": {"inputs": ["samples/csp"]}, "after": ["csp"]}
    plan = validate_plan(_plan(PREP, _sharded(shards=3, retries={"error": 2}), evaluate))
    parts = [f"csp.shard-{i}-of-3" for i in range(3)]
    assert [s.name for s in plan.stages] == ["prep", *parts, "csp", "ev"]
    for i, name in enumerate(parts):
        s = plan.stages[1 + i]
        assert s.name == name
        assert (s.kind, s.after, s.params["shard"]) == ("benchmark", ("prep",), {"index": i, "count": 3})
        assert s.params["seed"] == 3 and s.resources.gpus == 1 and s.retries["error"] == 2
    merge = plan.stages[4]
    assert (merge.kind, merge.after, merge.params) == ("merge", tuple(parts), {"of": "csp", "parts": parts})
    assert merge.resources.gpus == 0 and merge.retries["error"] == 2
    assert plan.stages[5].after == ("csp",)  # the dependent waits for the merge, i.e. for every part
    assert [s.name for s in plan.order()][-2:] == ["csp", "ev"]
    assert validate_plan(plan.to_dict()) == plan  # the expansion is a plan that validates to itself
    one = validate_plan(_plan(PREP, _sharded(shards=1)))
    assert [s.name for s in one.stages] == ["prep", "csp"] and one.stages[1].params.get("shard") is None


def test_shards_are_refused_where_a_stage_cannot_be_split() -> None:
    mcts = {"name": "m", "kind": "mcts", "params": {"prompt": "NaCl", "scorer": "random"}, "shards": 2}
    assert _errors(_plan(mcts)) == [
        "stages[0].shards: kind 'mcts' cannot be sharded; kinds that can: benchmark, evaluate, sample"
    ]
    assert _errors(_plan({**PREP, "shards": 1}))[0].startswith("stages[0].shards: kind 'prepare' cannot be sharded")
    plugin = {"name": "x", "kind": "myplugin", "params": {}, "shards": 2}
    assert _errors(_plan(plugin), {"myplugin"})[0].startswith("stages[0].shards: kind 'myplugin' cannot")
    assert _errors(_plan(PREP, _sharded(shards=0))) == ["stages[1].shards: Input should be greater than or equal to 1"]
    assert _errors(_plan(PREP, _sharded(shards=257))) == ["stages[1].shards: Input should be less than or equal to 256"]
    long = {**_sharded(shards=2), "name": "c" * 60}
    assert _errors(_plan(PREP, long)) == [
        f"stages[1].shards: part name '{'c' * 60}.shard-0-of-2' is longer than names may be (64 characters); "
        "rename the stage"
    ]
    taken = {**PREP, "name": "csp.shard-1-of-2"}
    assert _errors(_plan(PREP, _sharded(shards=2), taken))[0] == (
        "stages[1].shards: part name 'csp.shard-1-of-2' is the name of another stage; rename the stage"
    )
    both = _sharded(params={"test": "/t.csv", "shard": {"index": 0, "count": 2}}, shards=2)
    assert _errors(_plan(PREP, both)) == ["stages[1].params.shard: set by the stage's shards; give one of them"]
    bad = _sharded(params={"test": "/t.csv", "shard": {"index": 2, "count": 2}})
    assert _errors(_plan(PREP, bad)) == ["stages[1].params.shard: index 2 must be below count 2"]
