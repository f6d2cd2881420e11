"""``crystallm evaluate``: check many CIFs for validity, in parallel, and summarise.

Inputs are .cif files, directories of them (recursive), tarballs and CSV tables with a ``cif``
column (read by :mod:`crystallm_core.inputs`). :func:`evaluate_texts` is the library entry point
that samplers and benchmarks call; the verb adds input reading, a table or one JSON object on
stdout, per-CIF JSON lines (``--out``) and metric events.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystallm_core import events
from crystallm_core.inputs import CIF_SUFFIX, InputError, Record, read_input
from crystallm_core.registry import Registry
from crystallm_core.shards import add_shard_argument
from crystallm_core.validity import Validity, check

CHECKS = ("sensible", "formula_ok", "multiplicity_ok", "bonds_ok", "spacegroup_ok", "is_valid")
MAX_CHUNK = 64  # CIFs per task sent to a worker: large enough to amortise pickling, small enough to balance
SMOKE_INPUTS = 64  # --smoke checks only this many CIFs


@dataclass(frozen=True)
class Summary:
    """Counts over a set of CIFs. ``mean_bond_score`` averages the CIFs that got a score."""

    count: int
    counts: dict[str, int]
    mean_bond_score: float | None
    failures_by_reason: dict[str, int]  # reason code -> number of CIFs with at least one such reason

    @property
    def rates(self) -> dict[str, float]:
        return {k: (self.counts[k] / self.count if self.count else 0.0) for k in CHECKS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "rates": self.rates,
            "counts": dict(self.counts),
            "mean_bond_score": self.mean_bond_score,
            "failures_by_reason": dict(self.failures_by_reason),
        }


def summarize(results: Iterable[Validity]) -> Summary:
    counts = dict.fromkeys(CHECKS, 0)
    reasons: Counter[str] = Counter()
    n, scored, score_sum = 0, 0, 0.0
    for v in results:
        n += 1
        for k in CHECKS:
            counts[k] += bool(getattr(v, k))
        if v.bond_score is not None:
            scored += 1
            score_sum += v.bond_score
        reasons.update(v.codes)
    return Summary(n, counts, score_sum / scored if scored else None, dict(reasons.most_common()))


def check_texts(texts: Iterable[str], workers: int | None = None) -> Iterator[Validity]:
    """Verdicts in input order, computed on ``workers`` processes (default: all cores)."""
    texts = texts if isinstance(texts, Sequence) else list(texts)
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1 or len(texts) < 2:
        yield from map(check, texts)
        return
    chunk = max(1, min(MAX_CHUNK, len(texts) // (4 * workers)))
    with _context().Pool(min(workers, len(texts))) as pool:
        yield from pool.imap(check, texts, chunksize=chunk)


def _context() -> mp.context.BaseContext:
    """Workers fork from a clean server process that has already imported the checks: safe when the
    caller has threads (torch) and cheap to start, unlike spawn. Windows has spawn only."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["crystallm_core.validity"])
    return ctx


def evaluate_texts(texts: Iterable[str], workers: int | None = None) -> Summary:
    """Check every CIF text and summarise; the library entry point."""
    return summarize(check_texts(texts, workers))


METRICS: Registry[Callable[[str], float]] = Registry("metric")


def register_metric(name: str, fn: Callable[[str], float], *, source: str = "", replace: bool = False) -> None:
    """Add a per-CIF metric (CIF text -> number); ``crystallm evaluate`` reports its mean. Plugins call this."""
    METRICS.register(name, fn, source=source, replace=replace)


def metric_means(texts: Sequence[str]) -> dict[str, float | None]:
    """Mean of each registered metric over the CIFs it measured; a CIF where it raises or gives a
    non-finite number is left out of that metric's mean (None when no CIF was measured)."""
    means: dict[str, float | None] = {}
    for name in METRICS.names():
        fn, values = METRICS.get(name), []
        for text in texts:
            try:
                v = float(fn(text))
            except Exception:  # a plugin metric failing on one odd CIF must not end the evaluation
                continue
            if math.isfinite(v):
                values.append(v)
        means[name] = sum(values) / len(values) if values else None
    return means


# ---------------------------------------------------------------- the verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help=".cif files, directories of them, tarballs, CSV(.gz) with a cif column"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="write per-CIF results as JSON lines to this file")
    parser.add_argument("--smoke", action="store_true", help=f"only the first {SMOKE_INPUTS} CIFs of the inputs")
    add_shard_argument(parser, "CIFs (in input order)")


def _error(message: str) -> int:
    print(f"crystallm evaluate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        return _error(f"--workers must be at least 1, got {args.workers}")
    if args.out is not None and args.out.is_dir():
        return _error(f"--out {args.out} is a directory; give a file name such as {args.out / 'results.jsonl'}")
    try:
        records = read_records(args.paths)
    except InputError as exc:
        return _error(str(exc))
    if args.smoke:
        records = records[:SMOKE_INPUTS]
    if args.shard is not None:
        records = [records[i] for i in args.shard.part(len(records))]
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _error(f"--out {args.out}: cannot create its directory ({exc.strerror})")
    sink = _open_sink(args.out)
    try:
        results = _run_checks(records, args.workers, args.out, sink)
        summary = summarize(results)
        metrics = metric_means([r.text for r in records])
        if sink is not None:
            emit_summary(sink, summary, args.out)
            if metrics:
                sink.metric(0, **{f"metric_{k}": v for k, v in metrics.items() if v is not None})
    finally:
        if sink is not None:
            sink.close()
    if args.json:
        print(json.dumps({**summary.to_dict(), **({"metrics": metrics} if metrics else {})}))
    else:
        print_table(summary)
        for name, mean in metrics.items():
            print(f"mean {name}: {'n/a' if mean is None else f'{mean:.6g}'}")
    return 0


def read_records(paths: Iterable[str]) -> list[Record]:
    """All records of all inputs; every input is checked before the first is read."""
    readers: list[Iterable[Record]] = []
    for path in paths:
        p = Path(path)
        if p.is_file() and p.name.lower().endswith(CIF_SUFFIX):
            readers.append([_read_cif_file(p)])
        else:
            readers.append(read_input(path))
    return [record for reader in readers for record in reader]


def _read_cif_file(path: Path) -> Record:
    """One .cif file, decoded as the directory reader does (UTF-8, else Latin-1)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return Record(path.name[: -len(CIF_SUFFIX)], str(path), text, None)


def _open_sink(out: Path | None) -> events.JsonlSink | None:
    """Events go next to --out, or wherever $CRYSTALLM_EVENTS points; nowhere otherwise."""
    if out is not None:
        return events.open_sink(out.parent)
    if os.environ.get(events.ENV_VAR):
        return events.open_sink(Path.cwd())
    return None


def _run_checks(
    records: list[Record], workers: int | None, out: Path | None, sink: events.JsonlSink | None
) -> list[Validity]:
    """Check every record, writing --out lines as results arrive. The lines go to a partial file
    that replaces ``out`` only once complete, so an interrupted run leaves the previous file intact."""
    results: list[Validity] = []
    partial = None if out is None else out.with_name(out.name + ".partial")
    fh = None
    if partial is not None:
        fh = partial.open("w", encoding="utf-8")
    try:
        with events.ProgressReporter(sink, "evaluate", len(records)) as progress:
            for record, v in zip(records, check_texts([r.text for r in records], workers), strict=True):
                results.append(v)
                if fh is not None:
                    fh.write(json.dumps({"id": record.id, "source": record.source, **v.to_dict()}) + "\n")
                progress.update(len(results))
    finally:
        if fh is not None:
            fh.close()
    if partial is not None and out is not None:
        partial.replace(out)
    return results


def emit_summary(sink: events.JsonlSink, summary: Summary, out: Path | None) -> None:
    values: dict[str, float] = {"count": summary.count, **{f"{k}_rate": r for k, r in summary.rates.items()}}
    if summary.mean_bond_score is not None:
        values["mean_bond_score"] = summary.mean_bond_score
    sink.metric(0, **values)
    if out is not None:
        sink.artifact(out.resolve(), "report")


def print_table(summary: Summary) -> None:
    from rich.console import Console
    from rich.table import Table

    checks = Table(title=f"Validity of {summary.count} CIFs")
    checks.add_column("check")
    checks.add_column("passed", justify="right")
    checks.add_column("rate", justify="right")
    for k, rate in summary.rates.items():
        checks.add_row(k, str(summary.counts[k]), f"{rate:.4f}")
    score = "n/a" if summary.mean_bond_score is None else f"{summary.mean_bond_score:.4f}"
    checks.add_row("mean bond score", "", score)
    console = Console()
    console.print(checks)
    if summary.failures_by_reason:
        reasons = Table(title="Failures by reason")
        reasons.add_column("reason")
        reasons.add_column("CIFs", justify="right")
        for code, n in summary.failures_by_reason.items():
            reasons.add_row(code, str(n))
        console.print(reasons)
