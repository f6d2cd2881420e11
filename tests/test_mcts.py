"""Monte-Carlo tree search: selection rules, limits, determinism, validity gating, outputs and the CLI."""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from mcts_kit import prompt_formula, trained_tiny

from crystallm_core.checkpoint import load_model
from crystallm_core.events import read_events
from crystallm_core.mcts import MctsConfig, Outcome, Search, Tree
from crystallm_core.prompts import make_prompt
from crystallm_core.scorers import Scorer, ScorerError, ScoreResult, make_scorer
from crystallm_core.validity import check
from crystallm_core.vocab import get_vocab


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return trained_tiny(tmp_path_factory.getbasetemp() / "mcts-kit")


@pytest.fixture(scope="module")
def model_vocab(ckpt):
    model, vocab, _ = load_model(ckpt)
    return model, vocab


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices decode far faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recording(Scorer):
    """Scores like ``random`` and remembers every CIF it was asked about."""

    name = "recording"

    def __init__(self) -> None:
        self.inner = make_scorer("random", {"seed": 5})
        self.seen: list[str] = []
        self.calls = 0

    def score(self, cifs: Sequence[str]) -> list[ScoreResult]:
        self.calls += 1
        self.seen.extend(cifs)
        return self.inner.score(cifs)


def search(model_vocab, scorer: Scorer, out: Path | None = None, **cfg) -> Search:
    model, vocab = model_vocab
    settings = dict(iterations=12, rollouts_per_step=4, seed=0, max_nodes=500)
    settings.update(cfg)
    return Search(model, vocab, scorer, vocab.encode(make_prompt(prompt_formula())), MctsConfig(**settings), out=out)


def rows(out: Path) -> list[dict[str, str]]:
    with gzip.open(out / "cifs.csv.gz", "rt", newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- the tree alone


def tree_with_children(priors: list[float], selector: str = "puct", c: float = 1.0) -> Tree:
    vocab = get_vocab()
    cfg = MctsConfig(selector=selector, c=c, top_k=len(priors), rollouts_per_step=len(priors))
    tree = Tree([1, 2, 3], cfg, vocab, max_len=64)
    probs = torch.zeros(len(vocab))
    for i, p in enumerate(priors):
        probs[10 + i] = p
    tree.expand(tree.root, probs)
    return tree


def test_virtual_loss_spreads_one_steps_selections_over_different_leaves():
    tree = tree_with_children([0.5, 0.3, 0.2])
    leaves = [tree.select() for _ in range(3)]
    assert [leaf.token for leaf in leaves] == [10, 11, 12]
    assert tree.root.pending == 3
    for leaf in leaves:
        tree.backup(leaf, Outcome(False, error="invalid"))
    assert tree.root.pending == 0 and tree.root.n == 3


def test_rewards_are_min_max_normalised_at_selection_time():
    tree = tree_with_children([0.5, 0.3, 0.2])
    a, b, c = [tree.select() for _ in range(3)]
    tree.backup(a, Outcome(True, score=-5.0))
    tree.backup(b, Outcome(True, score=-1.0))
    tree.backup(c, Outcome(False, error="invalid"))
    assert tree.value(a) == 1.0 and tree.value(b) == 0.0 and tree.value(c) == -1.0
    d = tree.select()  # PUCT now prefers the best child
    assert d is a
    tree.backup(d, Outcome(True, score=-9.0))  # a new best rescales every node at once
    assert tree.value(b) == 0.0 and math.isclose(tree.value(a), (1.0 + 0.5) / 2)
    assert math.isclose(tree.value(tree.root), (1.0 + 0.5 + 0.0 - 1.0) / 4)


def test_uct_tries_every_child_and_greedy_follows_the_value():
    uct = tree_with_children([0.7, 0.2, 0.1], selector="uct")
    first = [uct.select() for _ in range(3)]
    assert sorted(n.token for n in first) == [10, 11, 12]
    greedy = tree_with_children([0.7, 0.2, 0.1], selector="greedy")
    a = greedy.select()
    greedy.backup(a, Outcome(True, score=-1.0))
    b = greedy.select()
    assert b is a  # a visited child at the parent's value beats unvisited ones only by its prior


def test_eos_children_are_terminal():
    vocab = get_vocab()
    tree = Tree([1], MctsConfig(top_k=2, rollouts_per_step=1), vocab, max_len=64)
    probs = torch.zeros(len(vocab))
    probs[vocab.eos_id], probs[20], probs[vocab.pad_id] = 0.5, 0.3, 0.9  # <pad> never becomes a child
    tree.expand(tree.root, probs)
    assert [(n.token, n.terminal) for n in tree.root.children] == [(vocab.eos_id, True), (20, False)]
    assert math.isclose(sum(n.prior for n in tree.root.children), 1.0)


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match=r"--max-nodes must be >= 1 \+ top_k \* \(rollouts_per_step \+ 1\) = 31"):
        MctsConfig(top_k=10, rollouts_per_step=2, max_nodes=30)
    with pytest.raises(ValueError, match="--selector must be one of puct, uct, greedy"):
        MctsConfig(selector="ucb")
    with pytest.raises(ValueError, match="--iterations must be >= 1"):
        MctsConfig(iterations=0)


# ---------------------------------------------------------------- searches with the trained model


@pytest.mark.parametrize("pipeline", [True, False])
def test_search_is_deterministic_by_seed_and_respects_its_iteration_limit(model_vocab, tmp_path, pipeline):
    stats = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        s = search(model_vocab, make_scorer("random"), tmp_path / name, iterations=10, seed=seed, pipeline=pipeline)
        stats.append(s.run())
    assert [st.rollouts for st in stats] == [10, 10, 10]
    assert stats[0].steps == 3  # 4 + 4 + 2
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert rows(tmp_path / "a") != rows(tmp_path / "c")
    keep = ("nodes", "max_depth", "cifs_scored", "invalid", "cache_hits", "best_score")
    assert [getattr(stats[0], k) for k in keep] == [getattr(stats[1], k) for k in keep]
    assert s.tree.root.n == 10 and s.tree.root.pending == 0  # the last step in flight was backed up


def test_a_pipelined_step_is_selected_before_the_previous_one_is_backed_up(model_vocab):
    """Pipelined, step t + 1 selects while step t's visits are still pending (virtual losses);
    unpipelined, every step starts from a fully backed-up tree."""
    seen: dict[bool, list[tuple[int, int]]] = {}
    for pipeline in (True, False):
        s = search(model_vocab, make_scorer("random"), iterations=12, pipeline=pipeline)
        step, log = s.step, []

        def spy(n, step=step, log=log, root=s.tree.root):
            log.append((root.n, root.pending))
            step(n)

        s.step = spy
        s.run()
        seen[pipeline] = log
    assert seen[False] == [(0, 0), (4, 0), (8, 0)]
    assert seen[True] == [(0, 0), (0, 4), (4, 4)]


def test_invalid_cifs_never_reach_the_scorer_and_no_cif_is_scored_twice(model_vocab, tmp_path):
    scorer = Recording()
    st = search(model_vocab, scorer, tmp_path, iterations=16).run()
    assert st.invalid > 0 and st.cifs_scored > 0, st  # both kinds occurred, so the gate was exercised
    assert all(check(cif).is_valid for cif in scorer.seen)
    assert len(set(scorer.seen)) == len(scorer.seen) == st.cifs_scored
    assert scorer.calls == st.scorer_calls <= st.steps
    assert st.cache_hits == st.rollouts - st.cifs_checked
    table = rows(tmp_path)
    assert len(table) == st.cifs_checked
    assert {r["cif"] for r in table if r["valid"] == "1"} == set(scorer.seen)
    assert all(r["score"] == "" and r["error"] for r in table if r["valid"] == "0")


def test_max_nodes_bounds_the_tree_by_pruning(model_vocab):
    s = search(model_vocab, make_scorer("random"), iterations=24, rollouts_per_step=2, top_k=3, max_nodes=13)
    st = s.run()
    assert st.prunes > 0 and st.pruned_nodes > 0
    assert st.peak_nodes <= 13 and st.nodes <= 13
    assert st.nodes == Tree._subtree_size(s.tree.root) == s.tree.size
    assert s.tree.root.n == 24 and sum(ch.n for ch in s.tree.root.children) == 24  # statistics survive pruning


def test_scorer_failures_are_penalised_and_a_dead_scorer_ends_the_search_with_outputs(model_vocab, tmp_path):
    st = search(model_vocab, make_scorer("random", {"fail_rate": 1.0}), iterations=8).run()
    assert st.cifs_scored > 0 and st.scorer_failures == st.cifs_scored and st.best_score is None

    class Dead(Scorer):
        def score(self, cifs):
            raise ScorerError("scorer server at tcp://127.0.0.1:1 did not answer")

    st = search(model_vocab, Dead(), tmp_path, iterations=40).run()
    assert st.error and "tcp://127.0.0.1:1" in st.error and st.rollouts < 40
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["stats"]["error"] == st.error


# ---------------------------------------------------------------- the verb


def run_cli(*args: str, env_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("INFRA_WKDIR", "CRYSTALLM_EVENTS")}
    env.update(INFRA_CONFIG_DIR=str(env_dir / "config"), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", "mcts", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def test_cli_writes_scored_cifs_best_structures_stats_and_events(ckpt, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(ckpt), "--prompt", prompt_formula(), "--scorer", "random", "--scorer-option", "low=-3"]
    args += ["--iterations", "8", "--rollouts-per-step", "4", "--check-workers", "1", "--out", str(out), "--seed", "2"]
    done = run_cli(*args, env_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "stats.json").read_text())
    stats = saved["stats"]
    for key in ("nodes", "max_depth", "rollouts", "scorer_calls", "cifs_scored", "cache_hits", "seconds"):
        assert key in stats
    assert stats["rollouts"] == 8 and saved["config"]["rollouts_per_step"] == 4
    assert stats["rollouts_per_s"] > 0
    scored = [r for r in rows(out) if r["score"]]
    assert len(scored) == stats["cifs_scored"] > 0
    assert all(-3.0 <= float(r["score"]) < 0.0 for r in scored)
    best = saved["best"][0]
    assert best["score"] == min(float(r["score"]) for r in scored) == stats["best_score"]
    assert check((out / best["file"]).read_text()).is_valid
    events = read_events(out / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "metric"] == [1, 2]
    progress = [(e["what"], e["done"], e["total"]) for e in events if e["type"] == "progress"]
    assert progress[-1] == ("mcts", 8, 8) and len(progress) <= 2  # throttled: not one per step
    assert {e["path"] for e in events if e["type"] == "artifact"} >= {"cifs.csv.gz", "stats.json"}


def test_cli_names_bad_flags(ckpt, tmp_path, monkeypatch, capsys):
    from crystallm_core.cli import main

    monkeypatch.delenv("INFRA_WKDIR", raising=False)
    monkeypatch.setenv("INFRA_CONFIG_DIR", str(tmp_path / "config"))
    base = ["mcts", "--model", str(ckpt), "--prompt", prompt_formula(), "--scorer", "random", "--out", str(tmp_path)]
    cases = [
        (["--max-nodes", "5"], "--max-nodes must be >= 1 + top_k"),
        (["--scorer-option", "colour"], "--scorer-option 'colour': expected KEY=VALUE"),
        (["--scorer-option", "colour=red"], "--scorer: scorer 'random' does not take option(s) colour"),
        (["--prompt", "Qq2"], "--prompt: composition 'Qq2'"),
        (["--scorer", "nope"], "--scorer: unknown scorer 'nope'"),
        (["--model", str(tmp_path / "none.pt")], "--model: checkpoint"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err, extra


def test_the_plan_stage_command_runs(ckpt, tmp_path):
    """The ``mcts`` stage kind of plans builds this verb's command line; it must run as built."""
    from infra.node.runner import stage_context
    from infra.spec.stages import get_stage_kind

    kind = get_stage_kind("mcts")
    params = kind.params(
        prompt=prompt_formula(),
        scorer="random",
        scorer_options={"low": "-3"},
        iterations=3,
        selector="uct",
        c=1.5,
        top_k=5,
        rollouts_per_step=2,
        max_nodes=1000,
        seed=4,
    )
    exp = tmp_path / "exp"
    (exp / "ckpts").mkdir(parents=True)
    (exp / "ckpts" / "best.pt").symlink_to(ckpt)  # the default model of the kind
    (argv,) = kind.build(params, stage_context(exp, "search", smoke=True)).steps
    assert argv[1:4] == ["-m", "crystallm_core.cli", "mcts"] and kind.extras(params) == {"scorer:random"}
    assert argv[argv.index("--scorer-option") + 1] == "low=-3" and argv[argv.index("--max-nodes") + 1] == "1000"
    done = run_cli(*argv[4:], env_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    saved = json.loads((exp / "samples" / "search" / "stats.json").read_text())
    assert saved["config"]["selector"] == "uct" and saved["stats"]["rollouts"] == 3
