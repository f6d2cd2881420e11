"""Splitting a generation or evaluation run into parts, and merging the parts' results.

``--shard I/S`` on ``crystallm sample``, ``benchmark csp`` and ``evaluate`` runs part ``I`` (0-based)
of ``S``: a contiguous range of the run's work units (sample: the (prompt, sample) items; csp: the test
structures; evaluate: the CIFs). The sampler's noise depends only on the seed and an item's number
(:mod:`crystallm_core.sampler`), so each part generates exactly what the whole run generates for its
items. ``crystallm merge KIND --out OUT PART...`` joins the parts, in part order, into the files the
whole run writes (same names, same format) and recomputes the figures from the per-unit results.
Nothing here knows where the parts ran.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crystallm_core.events import open_sink

if TYPE_CHECKING:
    from crystallm_core.evaluate import Summary

CSP_RESULTS = "results.jsonl"  # per test structure: index, formula, valid attempts, RMS of each attempt
CSP_SAMPLES = "samples.csv.gz"
CSP_REPORT = "csp.json"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def part(self, total: int) -> range:
        """This shard's contiguous range of ``total`` units; the ranges of all shards cover them in order."""
        return range(total * self.index // self.count, total * (self.index + 1) // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``I/S`` with 0 <= I < S (the argparse type of ``--shard``)."""
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"--shard must be I/S with 0 <= I < S (e.g. 0/4), got {text!r}")
    return Shard(int(index), int(count))


def add_shard_argument(p: argparse.ArgumentParser, unit: str) -> None:
    p.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="I/S",
        help=f"run part I (0-based) of S: a contiguous range of the {unit}; join parts with crystallm merge",
    )


# ---------------------------------------------------------------- merges


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def merge_sample(parts: list[Path], out: Path) -> Path:
    """Parts of ``crystallm sample``: directories of .cif files (copied) or CSV(.gz) tables (concatenated)."""
    if out.name.endswith((".csv", ".csv.gz")):
        header: list[str] | None = None
        rows: list[list[str]] = []
        for part in parts:
            h, r = _csv_rows(part)
            if header is not None and h != header:
                raise ValueError(f"{part}: columns {h} differ from the first part's {header}")
            header, rows = h, rows + r
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_csv(out, header or ["id", "prompt", "sample", "cif"], rows)
        return out
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        if not part.is_dir():
            raise ValueError(f"{part}: not a directory of .cif files (give --out FILE.csv[.gz] for CSV parts)")
        for f in sorted(part.glob("*.cif")):
            shutil.copyfile(f, out / f.name)
    return out


def merge_csp(parts: list[Path], out: Path) -> dict[str, object]:
    """Parts of ``crystallm benchmark csp`` (their --out directories): the samples and per-structure results
    are concatenated and the figures recomputed from them exactly as the whole run computes them."""
    from crystallm_core.csp import figures

    results: list[dict] = []
    header: list[str] | None = None
    rows: list[list[str]] = []
    seconds = 0.0
    for part in parts:
        for name in (CSP_RESULTS, CSP_SAMPLES, CSP_REPORT):
            if not (part / name).is_file():
                raise ValueError(f"{part}: no {name} (not the --out directory of a finished csp part)")
        with (part / CSP_RESULTS).open(encoding="utf-8") as fh:
            results += [json.loads(line) for line in fh if line.strip()]
        header, more = _csv_rows(part / CSP_SAMPLES)
        rows += more
        report = json.loads((part / CSP_REPORT).read_text(encoding="utf-8"))
        if report["samples_per_s"]:
            seconds += report["attempts"] / report["samples_per_s"]
    attempts = len(rows)
    result = figures(results, attempts / seconds if seconds else 0.0)  # per GPU: all attempts over the parts' time
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / CSP_SAMPLES, header or ["id", "prompt", "sample", "cif"], rows)
    write_csp_results(out / CSP_RESULTS, results)
    (out / CSP_REPORT).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return asdict(result)


def write_csp_results(path: Path, results: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for r in results:
            fh.write(json.dumps(r) + "\n")


def merge_evaluate(parts: list[Path], out: Path) -> Summary:
    """Parts of ``crystallm evaluate`` (their --out JSON lines): the lines concatenated in part order and the
    summary recomputed from them (the validity checks; registered metrics are not recomputed)."""
    from crystallm_core.evaluate import summarize
    from crystallm_core.validity import Validity

    lines: list[str] = []
    for part in parts:
        if not part.is_file():
            raise ValueError(f"{part}: no such file (the --out JSON lines of an evaluate part)")
        lines += [line for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]
    fields = ("sensible", "formula_ok", "multiplicity_ok", "spacegroup_ok", "bond_score", "bonds_ok", "reasons")
    summary = summarize(Validity(**{k: json.loads(line)[k] for k in fields}) for line in lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return summary


# ---------------------------------------------------------------- the verb

KINDS = ("sample", "csp", "evaluate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS, help="what the parts are: sample, csp (benchmark csp) or evaluate outputs")
    p.add_argument("parts", nargs="+", metavar="PART", help="the parts' outputs (their --out), in shard order")
    p.add_argument("--out", required=True, type=Path, help="where the whole run would have written (its --out)")


def run(args: argparse.Namespace) -> int:
    parts = [Path(p) for p in args.parts]
    try:
        if args.kind == "sample":
            out = merge_sample(parts, args.out)
            sink_dir = out if out.is_dir() else out.parent
            with open_sink(sink_dir) as sink:
                sink.artifact(out, "samples")
            print(f"{len(parts)} parts -> {out}")
        elif args.kind == "csp":
            figures = merge_csp(parts, args.out)
            with open_sink(args.out) as sink:
                sink.metric(0, **{k: v for k, v in figures.items() if v is not None})
                sink.artifact(args.out / CSP_REPORT, "report")
            print(json.dumps(figures))
        else:
            from crystallm_core.evaluate import emit_summary

            summary = merge_evaluate(parts, args.out)
            with open_sink(args.out.parent) as sink:
                emit_summary(sink, summary, args.out)
            print(json.dumps(summary.to_dict()))
    except (ValueError, KeyError, OSError) as e:
        print(f"crystallm merge: {e}", file=sys.stderr)
        return 2
    return 0
