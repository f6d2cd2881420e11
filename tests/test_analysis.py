import json
import math
import sys

import numpy as np
import pytest
import torch

from crystallm_core import analysis
from crystallm_core.analysis import ATOMS, HEATMAP_ATOMS, first_component, gaussian_mi, load_phiid
from crystallm_core.cli import main
from crystallm_core.layout import ExperimentLayout
from crystallm_core.probes import FORMAT, load_capture, write_capture

PNG = b"\x89PNG\r\n\x1a\n"
WINDOWS, POSITIONS, WIDTH = 6, 40, 16


def stand_in(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """A numpy stand-in for ΦID: every atom is a simple function of the pair, so the tables can be checked."""
    rho = float(np.corrcoef(x, y)[0, 1])
    return {a: rho * (i + 1) for i, a in enumerate(ATOMS)}


def make_capture(root, step: int, seed: int) -> None:
    """Sources a, b and targets c, d: c follows a closely, d follows b loosely, b and a are independent."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(WIDTH)

    def module(signal: np.ndarray, noise: float) -> torch.Tensor:
        acts = signal[..., None] * direction + noise * rng.standard_normal((WINDOWS, POSITIONS, WIDTH))
        return torch.from_numpy(acts).to(torch.float16)

    a, b = rng.standard_normal((2, WINDOWS, POSITIONS))
    c = a + 0.1 * rng.standard_normal((WINDOWS, POSITIONS))
    d = b + 1.0 * rng.standard_normal((WINDOWS, POSITIONS))
    acts = {"a": module(a, 0.05), "b": module(b, 0.05), "c": module(c, 0.05), "d": module(d, 0.05)}
    meta = {
        "format": FORMAT,
        "probe": "p",
        "step": step,
        "epoch": step / 100,
        "source_modules": ["a", "b"],
        "target_modules": ["c", "d"],
        "positions": list(range(POSITIONS)),
    }
    payload = {
        "metadata": meta,
        "source_activations": {k: acts[k] for k in "ab"},
        "target_activations": {k: acts[k] for k in "cd"},
        "labels": torch.zeros((WINDOWS, POSITIONS), dtype=torch.int64),
    }
    write_capture(ExperimentLayout(root).probe_capture("p", step), payload)


@pytest.fixture
def run_dir(tmp_path):
    for step, seed in ((10, 1), (20, 2), (30, 3)):
        make_capture(tmp_path, step, seed)
    return tmp_path


@pytest.fixture
def phiid(monkeypatch):
    calls: list[tuple[int, str]] = []

    def load(tau, redundancy):
        calls.append((tau, redundancy))
        return stand_in

    monkeypatch.setattr(analysis, "load_phiid", load)
    return calls


def is_png(path) -> bool:
    import matplotlib.image

    return path.read_bytes().startswith(PNG) and matplotlib.image.imread(path).ndim == 3


def test_first_component_recovers_the_dominant_direction():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal((4, 50))
    direction = rng.standard_normal(32)
    acts = signal[..., None] * direction + 0.01 * rng.standard_normal((4, 50, 32))
    series, explained = first_component(acts)
    assert series.shape == (200,)
    # Windows one after another; the sign follows the direction's largest loading, not the eigensolver's whim.
    sign = np.sign(direction[np.argmax(np.abs(direction))])
    assert np.corrcoef(series, sign * signal.reshape(-1))[0, 1] > 0.999
    assert explained > 0.99


def test_gaussian_mutual_information():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    y = 0.6 * x + 0.8 * rng.standard_normal(200_000)  # rho = 0.6
    assert gaussian_mi(x, y) == pytest.approx(-0.5 * math.log(1 - 0.36), abs=0.01)
    assert gaussian_mi(x, np.ones_like(x)) == 0.0


def test_analyze_all_pairs_writes_tables_and_heatmaps(run_dir, phiid, capsys):
    assert main(["probes", "analyze", str(run_dir), "--pairs", "all", "--tau", "2", "--redundancy", "CCS"]) == 0
    assert phiid == [(2, "CCS")]
    out = run_dir / "plots" / "p"
    table = json.loads((out / "phiid_eval_20.json").read_text())
    assert (table["probe"], table["step"], table["epoch"], table["samples"]) == ("p", 20, 0.2, WINDOWS * POSITIONS)
    assert table["capture"] == "probes/p/eval_20.pt.gz" and table["pairs"] == "all" and table["tau"] == 2
    assert set(table["explained_variance"]) == {"a", "b", "c", "d"}
    assert [(r["source"], r["target"]) for r in table["rows"]] == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    for row in table["rows"]:
        assert set(row) == {"source", "target", "mi", *ATOMS}
        assert row["sts"] == pytest.approx(16 * row["rtr"])  # what the stand-in returned, atom by atom
    ac = table["rows"][0]
    assert ac["rtr"] > 0.99 and ac["mi"] > 1.5  # c follows a
    summary = json.loads((out / "phiid.json").read_text())
    assert [c["step"] for c in summary["captures"]] == [10, 20, 30]
    assert len(summary["rows"]) == 12 and len(summary["mean"]) == 4
    assert summary["cost"]["decompositions"] == 12 and summary["cost"]["atoms_s"] >= 0
    mean_ac = [r for r in summary["mean"] if (r["source"], r["target"]) == ("a", "c")][0]
    per_capture = [r["rtr"] for r in summary["rows"] if (r["source"], r["target"]) == ("a", "c")]
    assert mean_ac["rtr"] == pytest.approx(np.mean(per_capture))
    for atom in HEATMAP_ATOMS:
        for prefix in ("eval_10", "eval_20", "eval_30", "mean", "trend"):
            assert is_png(out / f"{prefix}_{atom}.png"), f"{prefix}_{atom}.png"
    assert "p: 3 capture(s), 12 decompositions in" in capsys.readouterr().out


def test_top_n_keeps_the_pairs_with_the_most_mutual_information(run_dir, phiid):
    assert main(["probes", "analyze", str(run_dir), "--top-n", "2"]) == 0
    summary = json.loads((run_dir / "plots" / "p" / "phiid.json").read_text())
    assert [(p["source"], p["target"]) for p in summary["chosen_pairs"]] == [("a", "c"), ("b", "d")]
    assert summary["chosen_pairs"][0]["mean_mi"] > summary["chosen_pairs"][1]["mean_mi"] > 0.2
    assert (summary["pairs"], summary["top_n"]) == ("top-n", 2)
    table = json.loads((run_dir / "plots" / "p" / "phiid_eval_30.json").read_text())
    assert len(table["rows"]) == 2


def test_smoke_analyses_one_capture_and_one_pair(run_dir, phiid):
    assert main(["probes", "analyze", str(run_dir), "--pairs", "all", "--smoke"]) == 0
    out = run_dir / "plots" / "p"
    summary = json.loads((out / "phiid.json").read_text())
    assert [c["step"] for c in summary["captures"]] == [30]
    assert [(r["source"], r["target"]) for r in summary["rows"]] == [("a", "c")]
    assert not (out / "phiid_eval_10.json").exists() and not (out / "trend_rtr.png").exists()


def test_constant_series_give_null_atoms(tmp_path, phiid):
    make_capture(tmp_path, 5, 0)
    path = ExperimentLayout(tmp_path).probe_capture("p", 5)
    data = load_capture(path)
    d = data["target_activations"]["d"]
    data["target_activations"]["d"] = torch.full_like(d, 0.1) + torch.linspace(0, 1, d.shape[-1], dtype=d.dtype)
    write_capture(path, data)
    assert main(["probes", "analyze", str(tmp_path), "--pairs", "all"]) == 0
    rows = json.loads((tmp_path / "plots" / "p" / "phiid_eval_5.json").read_text())["rows"]
    bd = [r for r in rows if (r["source"], r["target"]) == ("b", "d")][0]
    assert bd["mi"] == 0.0 and all(bd[a] is None for a in ATOMS)


def test_without_omegaid_the_verb_says_what_to_install(run_dir, monkeypatch, capsys):
    for name in ("omegaid", "omegaid.core", "omegaid.core.decomposition"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    assert main(["probes", "analyze", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "omegaid cannot be imported" in err and "pip install 'infra[oid]'" in err and "Python >= 3.12" in err
    assert not (run_dir / "plots").exists()


def test_bad_runs_and_arguments_are_named(tmp_path, phiid, capsys):
    assert main(["probes", "analyze", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["probes", "analyze", str(tmp_path)]) == 2
    assert "no probe captures in" in capsys.readouterr().err
    make_capture(tmp_path, 1, 0)
    assert main(["probes", "analyze", str(tmp_path), "--probe", "q"]) == 2
    assert "no captures of probe 'q'; probes with captures: p" in capsys.readouterr().err
    assert main(["probes", "analyze", str(tmp_path), "--top-n", "0"]) == 2
    assert "--top-n must be at least 1" in capsys.readouterr().err
    (tmp_path / "probes" / "p" / "eval_2.pt.gz").write_bytes(b"not a capture")
    assert main(["probes", "analyze", str(tmp_path)]) == 2
    assert "eval_2.pt.gz is not a readable probe capture" in capsys.readouterr().err


def test_omegaid_atoms_of_a_known_system():
    """Runs where omegaid is installed (Python >= 3.12): information moving from x to y is unique x -> y."""
    pytest.importorskip("omegaid", reason="omegaid needs Python >= 3.12 (pip install 'infra[oid]')")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20_000)
    y = np.roll(x, 1) + 0.5 * rng.standard_normal(20_000)  # y now holds x one step ago
    atoms = load_phiid(tau=1, redundancy="MMI")(x, y)
    assert set(atoms) == set(ATOMS)
    assert atoms["xty"] > 0.3 and atoms["xty"] == max(atoms.values())


def test_top_n_takes_one_direction_of_each_module_pair():
    """With the same modules as sources and targets, (x, y) and (y, x) share their MI; top-n must name
    n different pairs, not one pair twice (the earlier form, seen on the perov_5 probe of all blocks)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=4000)
    series = {"a": a, "b": a + 0.1 * rng.normal(size=4000), "c": a + 1.0 * rng.normal(size=4000)}
    series["d"] = rng.normal(size=4000)
    mods = list(series)
    cap = analysis.Reduced(None, 10, 1.0, mods, mods, series, dict.fromkeys(mods, 1.0))
    chosen, mi = analysis.choose_pairs([cap], "top-n", 3)
    assert chosen == [("a", "b"), ("a", "c"), ("b", "c")]
    assert ("b", "a") not in mi  # a mirror is not a candidate of its own: its MI and atoms are its pair's
    assert len(analysis.choose_pairs([cap], "all", 3)[0]) == 6  # 4 modules: 6 unordered pairs


def test_all_pairs_of_one_module_list_analyse_each_unordered_pair_once_and_fill_both_cells():
    """8 blocks probed against themselves: 28 systems, not 56; a heatmap shows every off-diagonal cell of a
    directional atom (the mirror read off its pair) and a symmetric atom once, below the diagonal."""
    mods = [f"blocks.{i}" for i in range(8)]
    pairs = analysis.candidate_pairs(mods, mods)
    assert len(pairs) == 28 and all(mods.index(s) < mods.index(t) for s, t in pairs)
    rows = [{"source": s, "target": t, "mi": 0.1, **{a: float(k) for k, a in enumerate(ATOMS)}} for s, t in pairs]
    m = analysis.heatmap_matrices(rows, mods, mods)
    off = ~np.eye(8, dtype=bool)
    assert np.isfinite(m["xty"][off]).all() and np.isnan(np.diag(m["xty"])).all()
    # (blocks.5, blocks.2) was not analysed: its xty is the ytx of (blocks.2, blocks.5), and so on
    assert m["xty"][5, 2] == m["ytx"][2, 5] == ATOMS.index("ytx")
    assert m["xtx"][5, 2] == m["yty"][2, 5] == ATOMS.index("yty")
    for atom in ("rtr", "sts"):
        assert np.isfinite(m[atom][np.tril_indices(8, -1)]).all() and np.isnan(m[atom][np.triu_indices(8)]).all()
    assert analysis.mirror(analysis.mirror(rows[0])) == rows[0]


def test_the_mirror_of_a_system_is_its_decomposition_with_x_and_y_swapped():
    """Runs where omegaid is installed: ΦID of [y; x] equals the mirror of ΦID of [x; y] (MMI redundancy)."""
    pytest.importorskip("omegaid", reason="omegaid needs Python >= 3.12 (pip install 'infra[oid]')")
    rng = np.random.default_rng(1)
    x = rng.standard_normal(5_000)
    y = 0.7 * np.roll(x, 1) + 0.5 * rng.standard_normal(5_000)
    phiid = load_phiid(tau=1, redundancy="MMI")
    xy = {"source": "x", "target": "y", **phiid(x, y)}
    yx = {"source": "y", "target": "x", **phiid(y, x)}
    assert {a: analysis.mirror(xy)[a] for a in ATOMS} == pytest.approx({a: yx[a] for a in ATOMS}, abs=1e-9)


def test_trend_plots_draw_the_pairs_with_the_largest_atoms_only(tmp_path, monkeypatch):
    """28 lines make an unreadable plot: a trend keeps the TREND_PAIRS pairs with the largest mean |atom|."""
    from crystallm_core import analysis

    drawn = {}
    monkeypatch.setattr(analysis, "line_plot", lambda lines, title, *a: drawn.setdefault(title, lines) and tmp_path)
    pairs = [(f"b{i}", f"b{i + 1}") for i in range(10)]
    rows = [
        {"step": step, "source": s, "target": t, **dict.fromkeys(ATOMS, (i - 4.5) * step)}
        for step in (1, 2)
        for i, (s, t) in enumerate(pairs)
    ]
    analysis._trends(rows, pairs, "p", tmp_path)
    title = f"p: {HEATMAP_ATOMS['sts']}, {analysis.TREND_PAIRS} of 10 pairs (largest mean)"
    assert set(drawn[title]) == {f"b{i} -> b{i + 1}" for i in (0, 1, 2, 3, 6, 7, 8, 9)}  # |i - 4.5| largest
