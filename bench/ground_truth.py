"""Ground-truth validity: canonicalize every structure of a CSV and print the evaluate summary.

    .venv/bin/python bench/ground_truth.py ../shared/data/perov_5/test.csv.gz [--workers N] [--limit N] [--ratios]

Prints one JSON object: the summary of :func:`crystallm_core.evaluate.evaluate_texts` over the
canonical CIFs, plus the CSV path, the number of rows and how many could not be canonicalized.
``--ratios`` adds quantiles of the per-atom nearest-neighbour ratio (distance over expected bond
length) that the bond check thresholds. These are quality figures of the checks
(docs/VALIDITY.md), not timings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import warnings
from itertools import islice
from pathlib import Path

import numpy as np

from crystallm_core.evaluate import evaluate_texts
from crystallm_core.inputs import read_input

QUANTILES = (0.0, 0.001, 0.01, 0.5, 0.99, 0.999, 1.0)


def _canonical(cif: str) -> str | None:
    """The canonical text of a raw CIF, or None where pymatgen or canonicalization refuses it."""
    from pymatgen.core import Structure

    from crystallm_core.cif import canonicalize

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen reports rounding of near-special coordinates
            return canonicalize(Structure.from_str(cif, fmt="cif")).text
    except Exception:
        return None


def _ratios(text: str) -> np.ndarray:
    from crystallm_core.cif import parse_structure
    from crystallm_core.validity import nearest_bond_ratios

    return nearest_bond_ratios(parse_structure(text))


def canonical_texts(path: str | Path, workers: int, limit: int | None = None) -> tuple[list[str], int]:
    """Canonical CIFs of the first ``limit`` rows of a CSV (all by default), and the rows that failed."""
    raw = [r.text for r in islice(read_input(path), limit)]
    with mp.get_context("forkserver").Pool(workers) as pool:
        texts = pool.map(_canonical, raw, chunksize=64)
    ok = [t for t in texts if t is not None]
    return ok, len(raw) - len(ok)


def ratio_quantiles(texts: list[str], workers: int) -> dict[str, float]:
    with mp.get_context("forkserver").Pool(workers) as pool:
        ratios = np.concatenate(pool.map(_ratios, texts, chunksize=64))
    return {f"q{q:g}": round(float(np.quantile(ratios, q)), 4) for q in QUANTILES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="CSV(.gz) with a cif column")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--ratios", action="store_true", help="add nearest-neighbour ratio quantiles")
    args = parser.parse_args()
    texts, failed = canonical_texts(args.csv, args.workers, args.limit)
    report = {"csv": args.csv, "rows": len(texts) + failed, "canonicalize_failures": failed}
    report.update(evaluate_texts(texts, args.workers).to_dict())
    if args.ratios:
        report["nearest_ratio_quantiles"] = ratio_quantiles(texts, args.workers)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
