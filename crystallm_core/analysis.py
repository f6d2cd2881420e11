"""``crystallm probes analyze RUN_DIR``: integrated information decomposition (ΦID) between probed modules.

For each probe (captures ``probes/<probe>/eval_<step>.pt.gz``, see crystallm_core/probes.py), oldest
capture first:

1. **Reduction.** Each module's activations [windows, positions, width] become one series. The
   windows × positions tokens are samples in width-dimensional space; they are centred and projected
   on their first principal component (top eigenvector of the width × width covariance, sign fixed so
   that its largest loading is positive). The series runs over the kept positions of a window, windows
   one after another (length windows × positions). The share of variance kept is reported per module.
2. **Pairs.** Candidates are every (source module, target module) with source ≠ target, one direction of
   each: a module in both lists gives (x, y) and (y, x), whose MI is the same and whose atoms mirror each
   other (the decomposition of [y; x] is that of [x; y] with x and y swapped in every atom's name), so only
   the first in candidate order is analysed. ``--pairs all`` keeps every such pair (28 for 8 blocks probed
   against themselves); ``--pairs top-n`` keeps the ``--top-n`` whose series share the most mutual
   information, averaged over the analysed captures. That MI is the Gaussian estimate from the Pearson
   correlation ρ of the two series at the same token, I = -½ ln(1 - ρ²) nats.
3. **Atoms.** Each pair is a two-variable system (x: the source series, y: the target series); ΦID
   decomposes the information its past (lag ``--tau`` kept positions) carries about its future, with
   ``omegaid.core.decomposition.calc_phiid_multivariate([x; y], [x; y], tau, kind="gaussian",
   redundancy)``. omegaid returns per-sample (local) atoms; their means, in nats, are reported. All 16
   atoms are kept (``rtr`` redundancy→redundancy, ``sts`` synergy→synergy, ``xtx`` / ``yty`` unique
   information of the source / target that stays there, ``xty`` / ``ytx`` unique information that moves
   from source to target / target to source, and the other mixed terms, named as in omegaid). The lag
   crosses from one window into the next once per window: windows - 1 of the samples.

Written to ``plots/<probe>/``: ``phiid_eval_<step>.json`` (one row per pair: MI and atoms),
``phiid.json`` (all captures' rows and the mean over captures), and heatmaps (source modules ×
target modules, pairs not analysed left blank) of the atoms in :data:`HEATMAP_ATOMS`. A heatmap shows
each analysed pair in both of its cells where both exist, the mirror's atoms read off the pair's; an atom
that does not change under the swap (``rtr``, ``sts``: :data:`SYMMETRIC_ATOMS`) appears once, below the
diagonal, when sources and targets are the same modules:
``eval_<step>_<atom>.png`` per capture, ``mean_<atom>.png`` over captures, and, with two captures or
more, ``trend_<atom>.png`` (each pair's atom against the training step).

omegaid (Python >= 3.12) comes with ``pip install 'infra[oid]'``; ``OMEGAID_BACKEND=cupy`` runs it on
a GPU. :func:`load_phiid` is the only place that touches it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crystallm_core.events import ENV_VAR, JsonlSink
from crystallm_core.layout import ExperimentLayout
from crystallm_core.plots import heatmap, line_plot

ATOMS = (
    "rtr", "rtx", "rty", "rts",
    "xtr", "xtx", "xty", "xts",
    "ytr", "ytx", "yty", "yts",
    "str", "stx", "sty", "sts",
)  # fmt: skip
HEATMAP_ATOMS = {
    "rtr": "redundancy (rtr)",
    "sts": "synergy (sts)",
    "xtx": "unique to source (xtx)",
    "yty": "unique to target (yty)",
    "xty": "source to target (xty)",
    "ytx": "target to source (ytx)",
}
TREND_PAIRS = 8  # lines per trend plot
SYMMETRIC_ATOMS = frozenset(a for a in ATOMS if a == a.translate(str.maketrans("xy", "yx")))
INSTALL = "pip install 'infra[oid]' (omegaid needs Python >= 3.12)"
_CAPTURE = re.compile(r"eval_(\d+)\.pt\.gz")

AtomFunction = Callable[[np.ndarray, np.ndarray], dict[str, float]]
Pair = tuple[str, str]


class AnalysisError(ValueError):
    """Nothing to analyse, or captures that cannot be analysed; the message says which and why."""


class OmegaidMissing(ImportError):
    """omegaid cannot be imported here."""


def load_phiid(tau: int = 1, redundancy: str = "MMI") -> AtomFunction:
    """The ΦID atom function (mean local atoms of the system [x; y] at lag ``tau``), backed by omegaid."""
    try:
        from omegaid.core.decomposition import calc_phiid_multivariate
    except ImportError as e:
        here = f"Python {sys.version_info.major}.{sys.version_info.minor}"
        raise OmegaidMissing(f"omegaid cannot be imported on {here} ({e}); install it with {INSTALL}") from None

    def atoms(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        system = np.stack([x, y]).astype(np.float64)
        local, _ = calc_phiid_multivariate(system, system, tau=tau, kind="gaussian", redundancy=redundancy)
        return {name: float(np.mean(local[name])) for name in ATOMS}

    return atoms


def first_component(acts: np.ndarray) -> tuple[np.ndarray, float]:
    """[windows, positions, width] -> (series [windows * positions], share of the variance it keeps)."""
    x = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
    x -= x.mean(axis=0)
    cov = x.T @ x
    values, vectors = np.linalg.eigh(cov)
    v = vectors[:, -1]
    v = v if v[np.argmax(np.abs(v))] >= 0 else -v
    total = float(values.sum())
    return x @ v, (float(values[-1]) / total if total > 0 else 0.0)


def is_constant(x: np.ndarray) -> bool:
    """No variation beyond rounding: a module whose output does not change over the tokens."""
    return bool(np.std(x) <= 1e-9 * max(1.0, float(np.max(np.abs(x)))))


def gaussian_mi(x: np.ndarray, y: np.ndarray) -> float:
    """-½ ln(1 - ρ²) in nats; 0 when either series is constant."""
    if is_constant(x) or is_constant(y):
        return 0.0
    rho = float(np.corrcoef(x, y)[0, 1])
    return -0.5 * math.log(max(1.0 - rho * rho, 1e-12))


@dataclass
class Reduced:
    """One capture reduced to a series per module."""

    path: Path
    step: int
    epoch: float
    sources: list[str]
    targets: list[str]
    series: dict[str, np.ndarray]
    explained: dict[str, float]


def find_captures(layout: ExperimentLayout, probe: str | None = None) -> dict[str, list[Path]]:
    """probe -> its capture files by step; ``probe`` restricts to one (an unknown one is an error)."""
    found: dict[str, list[Path]] = {}
    if layout.probes_dir.is_dir():
        for d in sorted(p for p in layout.probes_dir.iterdir() if p.is_dir()):
            files = [(int(m.group(1)), f) for f in d.iterdir() if (m := _CAPTURE.fullmatch(f.name))]
            if files:
                found[d.name] = [f for _, f in sorted(files)]
    if not found:
        raise AnalysisError(f"no probe captures in {layout.probes_dir} (probes/<probe>/eval_<step>.pt.gz)")
    if probe is not None:
        if probe not in found:
            raise AnalysisError(f"no captures of probe {probe!r}; probes with captures: {', '.join(found)}")
        found = {probe: found[probe]}
    return found


def reduce_capture(path: Path) -> Reduced:
    from crystallm_core.probes import load_capture

    data = load_capture(path)
    meta = data["metadata"]
    series: dict[str, np.ndarray] = {}
    explained: dict[str, float] = {}
    for group in ("source_activations", "target_activations"):
        for name, tensor in data[group].items():
            if name not in series:
                series[name], explained[name] = first_component(tensor.float().numpy())
    return Reduced(
        path, int(meta["step"]), float(meta["epoch"]), meta["source_modules"], meta["target_modules"], series, explained
    )


def candidate_pairs(sources: list[str], targets: list[str]) -> list[Pair]:
    """Every (source, target) of distinct modules, one direction of each mirrored pair (the first met)."""
    pairs: list[Pair] = []
    for s in sources:
        for t in targets:
            if s != t and (t, s) not in pairs:
                pairs.append((s, t))
    return pairs


def mirror(row: dict[str, Any]) -> dict[str, Any]:
    """The row of (target, source) from that of (source, target): the same system with x and y swapped, so
    every atom's name swaps its x and y (``xty`` becomes ``ytx``, ``rtx`` becomes ``rty``) and MI stays."""
    swap = str.maketrans("xy", "yx")
    out = {**row, "source": row["target"], "target": row["source"]}
    for a in ATOMS:
        if a in row:
            out[a.translate(swap)] = row[a]
    return out


def heatmap_matrices(rows: list[dict[str, Any]], sources: list[str], targets: list[str]) -> dict[str, np.ndarray]:
    """Each heatmap atom's source × target matrix: the analysed pairs, their mirrors where both modules are
    in both lists, and a symmetric atom once (below the diagonal) when the two lists are the same modules."""
    both = [*rows, *(mirror(r) for r in rows if r["target"] in sources and r["source"] in targets)]
    same = sources == targets
    out = {}
    for atom in HEATMAP_ATOMS:
        m = _matrix(both, atom, sources, targets)
        if same and atom in SYMMETRIC_ATOMS:
            m[np.triu_indices(len(sources))] = np.nan
        out[atom] = m
    return out


def choose_pairs(captures: list[Reduced], mode: str, n: int) -> tuple[list[Pair], dict[Pair, float]]:
    """The pairs to analyse and the mean MI of every candidate (see the module docstring)."""
    last = captures[-1]
    candidates = candidate_pairs(last.sources, last.targets)
    if not candidates:
        raise AnalysisError(f"{last.path}: no (source, target) pair of distinct modules to analyse")
    mi = {}
    for s, t in candidates:
        values = [gaussian_mi(c.series[s], c.series[t]) for c in captures if s in c.series and t in c.series]
        mi[(s, t)] = float(np.mean(values))
    if mode == "all":
        return candidates, mi
    ranked = sorted(candidates, key=lambda p: (-round(mi[p], 9), candidates.index(p)))  # ties in candidate order
    return ranked[:n], mi


def _number(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _row(c: Reduced, pair: Pair, atoms_fn: AtomFunction, tau: int) -> dict[str, Any]:
    s, t = pair
    row: dict[str, Any] = {"source": s, "target": t}
    if s not in c.series or t not in c.series:
        return {**row, "mi": None, **dict.fromkeys(ATOMS)}
    x, y = c.series[s], c.series[t]
    if len(x) <= tau + 2:
        raise AnalysisError(f"{c.path}: series of {len(x)} samples are too short for a lag of {tau}")
    constant = is_constant(x) or is_constant(y)  # no distribution to decompose
    atoms = dict.fromkeys(ATOMS, math.nan) if constant else atoms_fn(x, y)
    return {**row, "mi": gaussian_mi(x, y), **{a: _number(float(atoms[a])) for a in ATOMS}}


def _matrix(rows: list[dict[str, Any]], atom: str, sources: list[str], targets: list[str]) -> np.ndarray:
    m = np.full((len(sources), len(targets)), np.nan)
    for r in rows:
        if r.get(atom) is not None:
            m[sources.index(r["source"]), targets.index(r["target"])] = r[atom]
    return m


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _pair_rows(rows: list[dict[str, Any]], pair: Pair) -> list[dict[str, Any]]:
    return [r for r in rows if (r["source"], r["target"]) == pair]


def analyze_probe(
    layout: ExperimentLayout,
    probe: str,
    paths: list[Path],
    atoms_fn: AtomFunction,
    pairs: str = "top-n",
    top_n: int = 4,
    tau: int = 1,
    redundancy: str = "MMI",
) -> list[Path]:
    """Reduce, pair, decompose and draw one probe's captures; returns the files written.

    ``phiid.json`` records the cost: seconds spent reducing captures and decomposing pairs, and omegaid's
    backend, so an all-pairs analysis can be planned from an earlier one."""
    t0 = time.perf_counter()
    captures = [reduce_capture(p) for p in paths]
    reduce_s = time.perf_counter() - t0
    atoms_s = 0.0
    chosen, mi = choose_pairs(captures, pairs, top_n)
    out = layout.probe_plots_dir(probe)
    settings: dict[str, Any] = {"reduction": "first principal component", "tau": tau, "redundancy": redundancy}
    settings.update({"pairs": pairs, "top_n": top_n} if pairs == "top-n" else {"pairs": pairs})
    written: list[Path] = []
    all_rows: list[dict[str, Any]] = []
    for c in captures:
        t0 = time.perf_counter()
        rows = [_row(c, p, atoms_fn, tau) for p in chosen]
        atoms_s += time.perf_counter() - t0
        table = {
            "probe": probe,
            "step": c.step,
            "epoch": c.epoch,
            "capture": layout.relative(c.path),
            **settings,
            "samples": len(next(iter(c.series.values()))),
            "explained_variance": c.explained,
            "rows": rows,
        }
        written.append(_write_json(out / f"phiid_eval_{c.step}.json", table))
        written += _heatmaps(rows, captures[-1], f"{probe} step {c.step}", out / f"eval_{c.step}")
        all_rows += [{"step": c.step, "epoch": c.epoch, **r} for r in rows]
    mean_rows = [
        {"source": s, "target": t, **{k: _mean([r[k] for r in _pair_rows(all_rows, (s, t))]) for k in ("mi", *ATOMS)}}
        for s, t in chosen
    ]
    summary = {
        "probe": probe,
        **settings,
        "captures": [{"step": c.step, "epoch": c.epoch, "capture": layout.relative(c.path)} for c in captures],
        "chosen_pairs": [{"source": s, "target": t, "mean_mi": mi[(s, t)]} for s, t in chosen],
        "rows": all_rows,
        "mean": mean_rows,
        "cost": {
            "backend": os.environ.get("OMEGAID_BACKEND", "numpy"),
            "decompositions": len(captures) * len(chosen),
            "reduce_s": round(reduce_s, 3),
            "atoms_s": round(atoms_s, 3),
        },
    }
    written.append(_write_json(out / "phiid.json", summary))
    written += _heatmaps(mean_rows, captures[-1], f"{probe} mean of {len(captures)} capture(s)", out / "mean")
    if len(captures) > 1:
        written += _trends(all_rows, chosen, probe, out)
    return written


def _heatmaps(rows: list[dict[str, Any]], axes: Reduced, title: str, prefix: Path) -> list[Path]:
    """One heatmap per atom of HEATMAP_ATOMS: the source modules x the target modules of ``axes``."""
    sources, targets = axes.sources, axes.targets
    matrices = heatmap_matrices(rows, sources, targets)
    return [
        heatmap(
            matrices[atom], sources, targets, f"{title}: {name}", "nats", prefix.with_name(f"{prefix.name}_{atom}.png")
        )
        for atom, name in HEATMAP_ATOMS.items()
    ]


def _trends(rows: list[dict[str, Any]], pairs: list[Pair], probe: str, out: Path) -> list[Path]:
    """Each pair's atoms against the training step, one PNG per atom of HEATMAP_ATOMS. With more than
    :data:`TREND_PAIRS` pairs (28 for eight blocks), the lines of the pairs with the largest mean absolute
    atom are drawn, so that the plot stays readable; the heatmaps show every pair."""
    written = []
    for atom, name in HEATMAP_ATOMS.items():
        lines = {
            f"{s} -> {t}": [(r["step"], r[atom]) for r in _pair_rows(rows, (s, t)) if r[atom] is not None]
            for s, t in pairs
        }
        lines = {k: v for k, v in lines.items() if v}
        title = f"{probe}: {name}"
        if len(lines) > TREND_PAIRS:
            size = {k: float(np.mean([abs(y) for _, y in v])) for k, v in lines.items()}
            kept = sorted(lines, key=lambda k: -size[k])[:TREND_PAIRS]
            title += f", {TREND_PAIRS} of {len(lines)} pairs (largest mean)"
            lines = {k: lines[k] for k in kept}
        if lines:
            written.append(line_plot(lines, title, "step", "nats", out / f"trend_{atom}.png"))
    return written


# ---------------------------------------------------------------- the verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = sub.add_parser("analyze", help="ΦID atoms between probed modules, as JSON tables and heatmaps")
    a.add_argument("run_dir", metavar="RUN_DIR", help="a training out_dir or an experiment directory")
    a.add_argument("--probe", default=None, help="analyse this probe only (default: every probe with captures)")
    a.add_argument("--pairs", choices=["top-n", "all"], default="top-n", help="which (source, target) pairs")
    a.add_argument("--top-n", type=int, default=4, help="pairs kept by --pairs top-n (highest mutual information)")
    a.add_argument("--tau", type=int, default=1, help="lag in kept token positions")
    a.add_argument("--redundancy", choices=["MMI", "CCS"], default="MMI", help="redundancy function of ΦID")
    a.add_argument("--smoke", action="store_true", help="the last capture and one pair only")


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"crystallm probes analyze: {message}", file=sys.stderr)
        return 2

    if args.top_n < 1:
        return fail(f"--top-n must be at least 1, got {args.top_n}")
    if args.tau < 1:
        return fail(f"--tau must be at least 1, got {args.tau}")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        return fail(f"{run_dir} is not a directory")
    try:
        atoms_fn = load_phiid(args.tau, args.redundancy)
    except OmegaidMissing as e:
        return fail(str(e))
    layout = ExperimentLayout(run_dir)
    mode, n = ("top-n", 1) if args.smoke else (args.pairs, args.top_n)
    written: list[Path] = []
    try:
        for probe, paths in find_captures(layout, args.probe).items():
            chosen = paths[-1:] if args.smoke else paths
            files = analyze_probe(layout, probe, chosen, atoms_fn, mode, n, args.tau, args.redundancy)
            where = layout.relative(layout.probe_plots_dir(probe))
            cost = json.loads((layout.probe_plots_dir(probe) / "phiid.json").read_text())["cost"]
            print(
                f"{probe}: {len(chosen)} capture(s), {cost['decompositions']} decompositions in {cost['atoms_s']} s "
                f"({cost['backend']}), {len(files)} files in {where}/"
            )
            written += files
    except ValueError as e:  # AnalysisError, unreadable captures
        return fail(str(e))
    if os.environ.get(ENV_VAR):
        with JsonlSink(os.environ[ENV_VAR]) as sink:
            for p in written:
                sink.artifact(p.resolve(), "plot" if p.suffix == ".png" else "report")
    return 0
