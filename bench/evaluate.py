"""Throughput of the validity checks on canonical CIFs.

    .venv/bin/python bench/evaluate.py [--prepared DIR] [--limit N]

Canonicalizes the perov_5 test set (or reads the canonical CIFs of a data set written by
``crystallm prepare`` when ``--prepared DIR`` is given), then times
:func:`crystallm_core.evaluate.evaluate_texts` with 2 workers. Prints one JSON line:
{"bench": "evaluate", "structures": n, "seconds": t, "structures_per_s": x, "workers": 2}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ground_truth import canonical_texts

from crystallm_core.evaluate import evaluate_texts

WORKERS = 2
PEROV_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perov_5" / "test.csv.gz"


def prepared_texts(directory: Path, limit: int | None) -> list[str]:
    from crystallm_core.store import Store

    with Store.open(directory / "structures.sqlite") as store:
        texts = [row.cif for row in store.iter_rows()]
    return texts[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=None, help="data set directory written by crystallm prepare")
    parser.add_argument("--limit", type=int, default=None, help="first N structures only")
    args = parser.parse_args()
    if args.prepared is not None:
        texts = prepared_texts(args.prepared, args.limit)
    else:
        texts, _ = canonical_texts(PEROV_TEST, WORKERS, args.limit)
    evaluate_texts(texts[: WORKERS * 4], WORKERS)  # starts the worker server outside the timing
    start = time.perf_counter()
    evaluate_texts(texts, WORKERS)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "bench": "evaluate",
                "structures": len(texts),
                "seconds": round(seconds, 3),
                "structures_per_s": round(len(texts) / seconds, 1),
                "workers": WORKERS,
            }
        )
    )


if __name__ == "__main__":
    main()
