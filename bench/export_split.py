"""Write one split of a prepared data set as a CSV of canonical CIFs, the input `crystallm benchmark csp` reads.

A data set that ``crystallm prepare --split ... --seed S`` made holds its structures and their split in
``structures.sqlite``; a benchmark on a held-out part of one input file (carbon_24 has only
``val.csv.gz`` here) reads that part back from the store, so the model never saw it:

    crystallm prepare ../shared/data/carbon_24/val.csv.gz --out carbon --split 0.8,0.1,0.1 --seed 0
    python bench/export_split.py carbon --split test --out carbon_test.csv.gz

(``crystallm benchmark csp --test carbon --test-split test`` reads the same split without the file.)

Prints one JSON line: the rows written and the sha256 of the file.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
from pathlib import Path

from crystallm_core.prepare import STORE_NAME
from crystallm_core.store import Store, parse_filter


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a prepared data set (directory holding structures.sqlite)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--out", required=True, help="CSV(.gz) to write, with columns material_id and cif")
    args = ap.parse_args()
    out = Path(args.out)
    opener = gzip.open if out.suffix == ".gz" else open
    rows = 0
    with Store.open(Path(args.data) / STORE_NAME) as store, opener(out, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["material_id", "cif"])
        for row in store.iter_rows([parse_filter(f"split={args.split}")]):
            writer.writerow([row.id, row.cif])
            rows += 1
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(json.dumps({"split": args.split, "rows": rows, "out": str(out), "sha256": digest}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
