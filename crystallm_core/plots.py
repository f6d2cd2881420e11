"""Training curves as PNG files: ``crystallm plot RUN_DIR`` and the end of every training run.

Reads the metric events of ``RUN_DIR/metrics/*.jsonl`` and ``RUN_DIR/events.jsonl`` and draws, into
``RUN_DIR/plots/``:

* ``loss.png``: training loss (every logged step) and validation loss (every evaluation);
* ``lr.png``: the learning rate;
* ``throughput.png``: training tokens per second.

A curve comes from every file that has the metric, labelled by the file's name. When a step was
logged twice (a run resumed from an earlier checkpoint), the later value wins. matplotlib is used
through its object API with the Agg canvas: no display, no global pyplot state. The heatmap and line
helpers here also draw the probe analysis (crystallm_core/analysis.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crystallm_core.events import ENV_VAR, JsonlSink, read_events
from crystallm_core.layout import ExperimentLayout

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# file name, title, y label, metrics drawn (label, event key)
CURVES = (
    ("loss.png", "Loss", "cross-entropy (nats/token)", (("train", "loss"), ("validation", "val_loss"))),
    ("lr.png", "Learning rate", "learning rate", (("lr", "lr"),)),
    ("throughput.png", "Throughput", "tokens/s", (("tokens/s", "tokens_per_s"),)),
)

Series = dict[str, list[tuple[int, float]]]


def metrics_files(run_dir: str | Path) -> list[Path]:
    """The event files of a run directory: ``metrics/*.jsonl`` (sorted), then ``events.jsonl``."""
    layout = ExperimentLayout(run_dir)
    files = sorted(layout.metrics_dir.glob("*.jsonl")) if layout.metrics_dir.is_dir() else []
    legacy = layout.root / "events.jsonl"
    return files + ([legacy] if legacy.is_file() else [])


def read_series(path: str | Path) -> Series:
    """metric name -> [(step, value)] sorted by step; a step logged again replaces the earlier value."""
    values: dict[str, dict[int, float]] = {}
    for event in read_events(path):
        if event.get("type") != "metric":
            continue
        for name, v in (event.get("values") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(name, {})[int(event["step"])] = float(v)
    return {name: sorted(points.items()) for name, points in values.items()}


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_png(fig: Figure, path: Path) -> Path:
    """Write a figure as PNG atomically (temporary file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_training(files: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Draw the curves of :data:`CURVES` from the training runs among ``files``; returns the PNGs written.

    Only files with a ``loss`` series count: other stages (a sampler's one ``tokens_per_s`` point)
    share the metrics folder but are not training curves.
    """
    every = {Path(f).stem: read_series(f) for f in files if Path(f).is_file()}
    series = {name: s for name, s in every.items() if "loss" in s}
    several = len(series) > 1
    written = []
    for filename, title, ylabel, metrics in CURVES:
        lines = {
            (f"{label} ({source})" if several else label): points
            for source, s in series.items()
            for label, key in metrics
            if (points := s.get(key))
        }
        if lines:
            written.append(line_plot(lines, title, "step", ylabel, Path(out_dir) / filename))
    return written


def line_plot(
    lines: dict[str, Sequence[tuple[float, float]]], title: str, xlabel: str, ylabel: str, path: Path
) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    for label, points in lines.items():
        x, y = zip(*points)
        ax.plot(x, y, label=label, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 4:  # beside the axes: inside, many labels would cover the lines
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize="small")
    return save_png(fig, path)


def heatmap(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, label: str, path: Path) -> Path:
    """``values`` [rows, cols]; NaN cells (pairs not computed) are left blank."""
    if np.shape(values) != (len(rows), len(cols)):
        raise ValueError(
            f"heatmap {path.name}: values of shape {np.shape(values)} for {len(rows)} x {len(cols)} labels"
        )
    fig = _figure(max(4.0, 1.0 + 0.6 * len(cols)), max(3.0, 1.0 + 0.45 * len(rows)))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(np.asarray(values, dtype=float))
    image = ax.imshow(masked, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(rows)), rows, fontsize="small")
    ax.set(title=title, xlabel="target module", ylabel="source module")
    mid = (masked.min() + masked.max()) / 2 if masked.count() else 0.0
    for (i, j), v in np.ndenumerate(masked.filled(np.nan)):
        if np.isfinite(v):
            colour = "black" if v > mid else "white"  # readable on viridis' bright and dark ends
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize="x-small", color=colour)
    fig.colorbar(image, ax=ax, label=label)
    return save_png(fig, path)


# ---------------------------------------------------------------- the verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training out_dir or an experiment directory")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"crystallm plot: {run_dir} is not a directory", file=sys.stderr)
        return 2
    files = metrics_files(run_dir)
    if not files:
        print(f"crystallm plot: no metrics in {run_dir} (looked for metrics/*.jsonl and events.jsonl)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ExperimentLayout(run_dir).plots_dir
    written = plot_training(files, out)
    if not written:
        names = ", ".join(str(f) for f in files)
        print(f"crystallm plot: no training curves (loss, lr, tokens/s) in {names}", file=sys.stderr)
        return 1
    if os.environ.get(ENV_VAR):
        with JsonlSink(os.environ[ENV_VAR]) as sink:
            for p in written:
                sink.artifact(p.resolve(), "plot")
    for p in written:
        print(p)
    return 0
