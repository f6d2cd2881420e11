import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crystallm_core import layout as layout_module
from crystallm_core.layout import (
    FOLDERS,
    RESERVED_NAMES,
    ExperimentLayout,
    LayoutError,
    check_probe_name,
    check_stage_name,
    experiment_dir,
    write_env_json,
    write_plan_json,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_path_is_where_the_layout_says(tmp_path):
    lay = ExperimentLayout(tmp_path / "exp")
    root = tmp_path / "exp"
    assert lay.plan_json == root / "plan.json"
    assert lay.env_json == root / "env.json"
    assert lay.data_dir == root / "data"
    assert lay.selection_json == root / "data" / "selection.json"
    assert lay.log_file("train") == root / "logs" / "train.log"
    assert lay.metrics_file("train") == root / "metrics" / "train.jsonl"
    assert lay.ckpts_dir == root / "ckpts"
    assert lay.samples_dir("bench") == root / "samples" / "bench"
    assert lay.probe_dir("mlp") == root / "probes" / "mlp"
    assert lay.probe_capture("mlp", 250) == root / "probes" / "mlp" / "eval_250.pt.gz"
    assert lay.plots_dir == root / "plots"
    assert lay.probe_plots_dir("mlp") == root / "plots" / "mlp"
    assert lay.artifacts_dir == root / "artifacts"
    assert lay.work_dir("train") == root / "work" / "train"
    assert not root.exists()  # paths only: nothing is created until ensure()


def test_ensure_creates_the_standard_folders(tmp_path):
    lay = ExperimentLayout(tmp_path / "exp").ensure()
    assert sorted(p.name for p in lay.root.iterdir()) == sorted(FOLDERS)
    assert all((lay.root / f).is_dir() for f in FOLDERS)
    lay.ensure()  # twice is fine


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "x" * 65, "sp ace", "/abs"])
def test_names_that_are_not_one_path_component_are_refused(tmp_path, name):
    lay = ExperimentLayout(tmp_path)
    with pytest.raises(LayoutError, match="stage name"):
        lay.log_file(name)
    with pytest.raises(LayoutError, match="stage name"):
        lay.work_dir(name)
    with pytest.raises(LayoutError, match="probe name"):
        lay.probe_dir(name)


def test_reserved_names_cover_every_top_level_entry(tmp_path):
    assert set(FOLDERS) | {"plan.json", "env.json"} == RESERVED_NAMES
    lay = ExperimentLayout(tmp_path / "exp")
    for name in RESERVED_NAMES:  # a stage named like a top-level entry: its paths are all nested, no collision
        assert check_stage_name(name) == name
        stage_paths = [lay.log_file(name), lay.metrics_file(name), lay.work_dir(name), lay.samples_dir(name)]
        assert all(p.parent != lay.root and p.parent.parent == lay.root for p in stage_paths)
    assert check_stage_name("train") == "train"
    with pytest.raises(LayoutError, match="stage name '..'"):
        check_stage_name("..")


def test_experiment_keys_are_checked_path_components(tmp_path):
    assert experiment_dir(tmp_path, "perov5-12") == tmp_path / "experiments" / "perov5-12"
    assert ExperimentLayout.in_workdir(tmp_path, "k").root == tmp_path / "experiments" / "k"
    assert experiment_dir(tmp_path, "a" * 128).name == "a" * 128  # a 64-character plan name, '-' and the id
    for bad in ("..", "a/b", "", "a" * 129):
        with pytest.raises(LayoutError, match="experiment key"):
            experiment_dir(tmp_path, bad)
    with pytest.raises(LayoutError, match="probe name 'a.b'"):
        check_probe_name("a.b")  # dots would make plots/<probe> look like a file


def test_relative_refuses_paths_outside_the_root(tmp_path):
    lay = ExperimentLayout(tmp_path / "exp").ensure()
    assert lay.relative(lay.ckpts_dir / "last.pt") == "ckpts/last.pt"
    assert lay.relative(lay.root / "plots" / ".." / "ckpts") == "ckpts"
    with pytest.raises(LayoutError, match="outside the experiment directory"):
        lay.relative(lay.root / ".." / "elsewhere")
    with pytest.raises(LayoutError, match="outside the experiment directory"):
        lay.relative("/etc/passwd")
    (lay.artifacts_dir / "escape").symlink_to(tmp_path)
    with pytest.raises(LayoutError, match="outside the experiment directory"):
        lay.relative(lay.artifacts_dir / "escape" / "x")


def test_relative_reads_relative_paths_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lay = ExperimentLayout("exp").ensure()
    assert lay.relative(lay.ckpts_dir) == "ckpts"
    assert lay.relative("exp/plots/loss.png") == "plots/loss.png"
    with pytest.raises(LayoutError):
        lay.relative("ckpts")  # ./ckpts, not exp/ckpts


def test_list_artifacts_walks_the_standard_folders(tmp_path):
    lay = ExperimentLayout(tmp_path / "exp").ensure()
    files = {
        "plan.json": "{}",
        "env.json": "{}",
        "data/meta.json": "{}",
        "logs/train.log": "line\n",
        "metrics/train.jsonl": "",
        "ckpts/last.pt": "x" * 10,
        "samples/bench/csp.json": "{}",
        "probes/mlp/eval_4.pt.gz": "z",
        "plots/mlp/mean_rtr.png": "p",
        "artifacts/notes.txt": "n",
        "work/train/scratch.txt": "not an artifact",
        "ckpts/.last.pt.tmp-1": "a write in progress",
        "stray.txt": "outside the standard entries",
    }
    for rel, text in files.items():
        (lay.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (lay.root / rel).write_text(text)
    (lay.artifacts_dir / "link").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text("secret")
    found = {a.path: (a.kind, a.bytes) for a in lay.list_artifacts()}
    assert found == {
        "plan.json": ("plan", 2),
        "env.json": ("env", 2),
        "data/meta.json": ("data", 2),
        "logs/train.log": ("log", 5),
        "metrics/train.jsonl": ("metrics", 0),
        "ckpts/last.pt": ("checkpoint", 10),
        "samples/bench/csp.json": ("samples", 2),
        "probes/mlp/eval_4.pt.gz": ("probe", 1),
        "plots/mlp/mean_rtr.png": ("plot", 1),
        "artifacts/notes.txt": ("artifact", 1),
    }
    assert [a.path for a in lay.list_artifacts()] == sorted(found)
    assert ExperimentLayout(tmp_path / "missing").list_artifacts() == []


def test_plan_json_is_written_atomically_and_checked(tmp_path):
    lay = ExperimentLayout(tmp_path / "exp")
    plan = {"name": "demo", "smoke": True, "stages": [{"name": "train", "kind": "train", "params": {}}]}
    path = write_plan_json(lay, plan)
    assert path == lay.plan_json and json.loads(path.read_text()) == plan
    assert [p.name for p in lay.root.iterdir()] == ["plan.json"]  # no temporary file left
    with pytest.raises(LayoutError, match="must be a mapping"):
        write_plan_json(lay, ["not", "a", "plan"])
    with pytest.raises(LayoutError, match="not JSON-serialisable"):
        write_plan_json(lay, {"when": object()})
    with pytest.raises(LayoutError, match="not JSON-serialisable"):
        write_plan_json(lay, {"lr": float("nan")})
    assert json.loads(path.read_text()) == plan  # a refused plan leaves the recorded one alone


def test_env_json_records_versions_commit_and_devices(tmp_path):
    import torch

    env = json.loads(write_env_json(ExperimentLayout(tmp_path)).read_text())
    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["packages"]["omegaid"] is None or isinstance(env["packages"]["omegaid"], str)
    assert env["platform"]["machine"]
    assert env["devices"]["cpus"] == os.cpu_count()
    assert env["devices"]["torch"]["version"] == torch.__version__  # torch is imported here, so it is asked
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"])
        assert isinstance(env["git"]["dirty"], bool)


def test_env_json_never_fails(tmp_path, monkeypatch):
    def broken(_name):
        raise RuntimeError("metadata unavailable")

    monkeypatch.setattr(layout_module.metadata, "version", broken)
    monkeypatch.setattr(layout_module.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    env = json.loads(write_env_json(ExperimentLayout(tmp_path)).read_text())
    assert env["packages"] == {"error": "RuntimeError: metadata unavailable"}
    if (ROOT / ".git").exists():
        assert env["git"] == {"error": "OSError: no git"}
    assert env["python"]["version"]


def test_layout_imports_nothing_heavy_and_asks_no_gpu_without_torch(tmp_path):
    code = (
        "import sys, json\n"
        "from crystallm_core.layout import ExperimentLayout, write_env_json\n"
        f"env = json.loads(write_env_json(ExperimentLayout({str(tmp_path)!r})).read_text())\n"
        "heavy = [m for m in ('torch', 'numpy', 'pymatgen', 'matplotlib', 'yaml', 'pydantic') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'torch_asked': 'torch' in env['devices']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"heavy": [], "torch_asked": False}
