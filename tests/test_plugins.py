"""Plugins from a node's workdir and from entry points: loading, isolation of broken and hanging
plugins, listing, and use by the ``crystallm`` verbs (real subprocesses)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from mcts_kit import prompt_formula, trained_tiny

from crystallm_core.plugins import resolve_workdir

PLUGINS = {
    "scorer/const_scorer.py": """
        from crystallm_core.scorers import Scorer, ScoreResult, register_scorer

        class LineScorer(Scorer):
            name = "test-lines"

            def __init__(self, offset: float = 0.0) -> None:
                self.offset = offset

            def score(self, cifs):
                return [ScoreResult(score=self.offset - text.count("\\n") / 100) for text in cifs]

        register_scorer("test-lines", LineScorer)
    """,
    "scorer/uses_sibling.py": """
        from crystallm_core.scorers import register_scorer
        from infra_ext.scorer.const_scorer import LineScorer

        register_scorer("test-lines-2", lambda: LineScorer(offset=1.0))
    """,
    "scorer/broken.py": """
        import os

        raise RuntimeError("boom")
    """,
    "scorer/bad-name.py": "",
    "vocab/extra_vocab.py": """
        from crystallm_core.vocab import Vocabulary, cif_tokens, register_vocab

        register_vocab("test-vocab", lambda: Vocabulary("test-vocab", [*cif_tokens(), "<extra>"]))
    """,
    "model/micro.py": """
        from crystallm_core.model import register_model

        register_model("test-micro", dict(n_layer=1, n_head=2, n_embd=32, block_size=64))
    """,
    "metrics/lines.py": """
        from crystallm_core.evaluate import register_metric

        register_metric("test-newlines", lambda text: text.count("\\n"))
    """,
    "stage/echo.py": """
        from infra.spec.stages import Command, Spec, StageKind, register_stage

        class EchoParams(Spec):
            text: str

        register_stage("test-echo", StageKind(EchoParams, lambda p, ctx: Command([["echo", p.text]])))
    """,
    "scorers/typo.py": "",
}


HANGS = """
import os, pathlib, time

pathlib.Path(os.environ["HANG_PID_FILE"]).write_text(str(os.getpid()))
time.sleep(600)
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("workdir")
    for rel, text in PLUGINS.items():
        path = wd / "plugins" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return wd


def env_for(tmp_path: Path, workdir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("INFRA_WKDIR", "CRYSTALLM_EVENTS")}
    env.update(INFRA_CONFIG_DIR=str(tmp_path / "config"), OMP_NUM_THREADS="1", INFRA_PLUGIN_TIMEOUT="3")
    env["HANG_PID_FILE"] = str(tmp_path / "hang.pid")
    if workdir is not None:
        env["INFRA_WKDIR"] = str(workdir)
    env.update(extra)
    return env


def crystallm(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_list_shows_what_loaded_and_what_failed_and_leaves_no_process(workdir, tmp_path):
    workdir = Path(shutil.copytree(workdir, tmp_path / "wd"))
    (workdir / "plugins" / "scorer" / "hangs.py").write_text(HANGS)
    done = crystallm("plugins", "list", "--json", "--workdir", str(workdir), "--timeout", "2", env=env_for(tmp_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["workdir"] == str(workdir.resolve())
    source = {(r["kind"], r["name"]): r["source"] for r in report["registered"]}
    plugins = workdir.resolve() / "plugins"
    assert source[("scorer", "test-lines")] == str(plugins / "scorer" / "const_scorer.py")
    assert source[("scorer", "test-lines-2")] == str(plugins / "scorer" / "uses_sibling.py")
    assert source[("vocab", "test-vocab")] == str(plugins / "vocab" / "extra_vocab.py")
    assert source[("model", "test-micro")] == str(plugins / "model" / "micro.py")
    assert source[("metric", "test-newlines")] == str(plugins / "metrics" / "lines.py")
    assert not any(kind == "stage" for kind, _ in source)  # stage kinds are the node's (infra.node.stage_plugins)
    assert source[("scorer", "random")] == "entry point random-scorer (infra)"
    assert source[("vocab", "cif-v1")] == source[("model", "tiny")] == "built-in"
    failed = {Path(f["source"]).name: f["error"] for f in report["failed"]}
    assert failed["broken.py"] == "RuntimeError: boom (line 3)"
    assert failed["hangs.py"].startswith("import did not finish within 2 s")
    assert "not a Python identifier" in failed["bad-name.py"]
    assert "unknown plugin folder 'scorers'" in failed["scorers"]
    assert set(failed) == {"broken.py", "hangs.py", "bad-name.py", "scorers"}
    hung = int((tmp_path / "hang.pid").read_text())
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE


def test_workdir_scorer_is_used_by_mcts(workdir, tmp_path_factory, tmp_path):
    ckpt = trained_tiny(tmp_path_factory.getbasetemp() / "mcts-kit")
    out = tmp_path / "out"
    args = ["mcts", "--model", str(ckpt), "--prompt", prompt_formula(), "--scorer", "test-lines"]
    args += ["--scorer-option", "offset=-1", "--iterations", "4", "--rollouts-per-step", "4", "--check-workers", "1"]
    done = crystallm(*args, "--out", str(out), env=env_for(tmp_path, workdir))
    assert done.returncode == 0, done.stderr
    assert "plugin " in done.stderr and "broken.py skipped: RuntimeError: boom" in done.stderr
    with gzip.open(out / "cifs.csv.gz", "rt", newline="") as fh:
        scored = [r for r in csv.DictReader(fh) if r["score"]]
    assert scored, "no CIF was scored"
    assert all(float(r["score"]) == -1 - r["cif"].count("\n") / 100 for r in scored)


def test_evaluate_reports_plugin_metrics(workdir, tmp_path):
    cif = tmp_path / "x.cif"
    cif.write_text("data_x\n_cell_length_a 1\n")
    done = crystallm("evaluate", str(cif), "--json", "--workers", "1", env=env_for(tmp_path, workdir))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["metrics"] == {"test-newlines": 2.0}


def test_library_loader_returns_a_report_and_plugin_registrations_work(workdir, tmp_path):
    code = textwrap.dedent(f"""
        import json, sys
        from crystallm_core.plugins import load_plugins
        report = load_plugins({str(workdir)!r}, timeout=2)
        again = load_plugins({str(workdir)!r}, timeout=2)  # nothing is imported twice
        from crystallm_core.model import named_config
        from crystallm_core.vocab import get_vocab
        assert named_config("test-micro", 10).n_embd == 32
        assert get_vocab("test-vocab").tokens[-1] == "<extra>"
        assert sys.modules["infra_ext.scorer.const_scorer"].LineScorer
        print(json.dumps([len(report.loaded), len(again.loaded), len(report.failed), len(again.failed)]))
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env_for(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    loaded, loaded_again, failed, failed_again = json.loads(done.stdout)
    # 3 entry points + 5 files (plugins/stage/echo.py is the node's: infra.node.stage_plugins)
    assert loaded == loaded_again == 3 + 5 and failed == failed_again == 3


def test_entry_points_of_other_distributions_are_loaded_and_broken_ones_reported(tmp_path):
    site = tmp_path / "site"
    info = site / "fakeplug-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[crystallm.plugins]\ntest-ep = fakeplug_mod:register\ntest-broken-ep = fakeplug_missing\n"
    )
    (site / "fakeplug_mod.py").write_text(
        "def register():\n"
        "    from crystallm_core.scorers import register_scorer\n"
        "    from infra.plugins.scorers.random_scorer import RandomScorer\n"
        "    register_scorer('test-ep-scorer', RandomScorer)\n"
    )
    both = "from crystallm_core.cli import main; main(['plugins', 'list', '--json']); main(['plugins', 'list'])"
    done = subprocess.run(
        [sys.executable, "-c", both],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_for(tmp_path, PYTHONPATH=str(site)),
    )
    assert done.returncode == 0, done.stderr
    as_json, as_text = done.stdout.split("\n", 1)
    report = json.loads(as_json)
    source = {(r["kind"], r["name"]): r["source"] for r in report["registered"]}
    assert source[("scorer", "test-ep-scorer")] == "entry point test-ep (fakeplug)"
    failed = {f["source"]: f["error"] for f in report["failed"]}
    assert failed == {
        "entry point test-broken-ep (fakeplug)": "ModuleNotFoundError: No module named 'fakeplug_missing'"
    }
    assert "test-ep-scorer  entry point test-ep (fakeplug)" in as_text
    assert "entry point test-broken-ep (fakeplug): ModuleNotFoundError" in as_text


def test_workdir_comes_from_the_flag_then_the_environment_then_infra_wkdir(tmp_path, monkeypatch):
    config = tmp_path / "config"
    monkeypatch.setenv("INFRA_CONFIG_DIR", str(config))
    monkeypatch.delenv("INFRA_WKDIR", raising=False)
    assert resolve_workdir() is None
    config.mkdir()
    (config / "wkdir").write_text(f"{tmp_path / 'saved'}\n")  # what infra-wkdir --set writes
    assert resolve_workdir() == tmp_path / "saved"
    monkeypatch.setenv("INFRA_WKDIR", str(tmp_path / "env"))
    assert resolve_workdir() == tmp_path / "env"
    assert resolve_workdir(tmp_path / "flag") == tmp_path / "flag"


def test_list_names_a_missing_workdir(tmp_path):
    done = crystallm("plugins", "list", "--workdir", str(tmp_path / "nowhere"), env=env_for(tmp_path), timeout=60)
    assert done.returncode == 2 and f"--workdir {tmp_path / 'nowhere'} is not a directory" in done.stderr


def test_the_built_in_plugins_are_entry_points_of_the_distribution_that_installs_the_core():
    """The core names no module of the cluster side: it trusts the entry points of the distribution that
    installed crystallm_core itself (setup.py declares the built-in scorers there)."""
    from importlib import metadata

    from crystallm_core import plugins

    mine = plugins.own_distributions()
    assert mine == {"infra"}
    own, _ = plugins._entry_point_items()
    declared = {i.ep_name: i.ep_value for i in own}
    assert declared == {
        "chgnet-scorer": "infra.plugins.scorers.chgnet_scorer",
        "random-scorer": "infra.plugins.scorers.random_scorer",
        "zmq-scorer": "infra.plugins.scorers.zmq_scorer",
    }
    assert {ep.group for ep in metadata.distribution("infra").entry_points} == {
        "console_scripts",
        plugins.ENTRY_POINT_GROUP,
    }


def test_modules_of_another_registry_load_through_the_same_isolated_loader(tmp_path):
    """load_modules: what a caller with its own registry (the node's stage kinds) uses; a hang is a failure."""
    from crystallm_core.plugins import load_modules

    good, broken, hangs = tmp_path / "good.py", tmp_path / "broken.py", tmp_path / "hangs.py"
    good.write_text("VALUE = 1\n")
    broken.write_text("raise RuntimeError('boom')\n")
    hangs.write_text("import time\ntime.sleep(600)\n")
    loaded, failed = load_modules([str(good), str(broken), str(hangs)], timeout=2, prefix="test_isolated")
    assert loaded == [str(good)] and sys.modules["test_isolated_good"].VALUE == 1
    assert [(f.source, f.hung) for f in failed] == [(str(broken), False), (str(hangs), True)]
    assert failed[0].error == "RuntimeError: boom (line 1)" and "test_isolated_broken" not in sys.modules
