"""Throughput of data preparation: ``prepare`` on a real data set into a temporary directory.

Prints one JSON line: {"bench": "prepare", "input", "structures", "rejected", "seconds",
"structures_per_s", "workers"}. The time covers the whole run (reading, parsing and
canonicalization in the pool, store, splits, token files), not interpreter start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from crystallm_core.prepare import prepare

DEFAULT_INPUT = "../shared/data/perov_5/test.csv.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", default=DEFAULT_INPUT, help=f"input to prepare (default {DEFAULT_INPUT})")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    if not Path(args.input).exists():
        parser.error(f"{args.input}: no such file (run from the project root, or give the path)")
    os.environ.pop("CRYSTALLM_EVENTS", None)  # events go into the temporary directory
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        started = time.perf_counter()
        report = prepare([args.input], Path(tmp) / "data", workers=args.workers)
        seconds = time.perf_counter() - started
    result = {
        "bench": "prepare",
        "input": args.input,
        "structures": report.read,
        "rejected": report.rejected,
        "seconds": round(seconds, 3),
        "structures_per_s": round(report.read / seconds, 1),
        "workers": args.workers,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
