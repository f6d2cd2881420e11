"""Shared fixtures: real data from ../shared/data, read in place, never copied."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PEROV_TEST = SHARED / "perov_5" / "test.csv.gz"
PEROV_VAL = SHARED / "perov_5" / "val.csv.gz"
CARBON_VAL = SHARED / "carbon_24" / "val.csv.gz"


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    if not path.exists():
        pytest.skip(f"{path} is missing: the shared data sets live beside the checkout in ../shared/data")
    with gzip.open(path, "rt", newline="") as fh:
        rows = []
        for row in csv.DictReader(fh):
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


@pytest.fixture(scope="session")
def perov_rows() -> list[dict[str, str]]:
    return read_rows(PEROV_TEST, 200)


@pytest.fixture(scope="session")
def carbon_rows() -> list[dict[str, str]]:
    return read_rows(CARBON_VAL, 100)


@pytest.fixture(scope="session")
def demo8(tmp_path_factory) -> Path:
    """Eight demo structures prepared into a data set (all in the train split)."""
    from crystallm_core.demo import write_demo_csv
    from crystallm_core.prepare import prepare

    root = tmp_path_factory.mktemp("demo8")
    raw = write_demo_csv(root / "raw.csv.gz", n=8, seed=0)
    prepare([raw], root / "data", workers=1, split=(1.0, 0.0, 0.0))
    return root / "data"


@pytest.fixture(scope="session")
def demo_small(tmp_path_factory) -> Path:
    """Sixty demo structures prepared into train/val/test."""
    from crystallm_core.demo import write_demo_csv
    from crystallm_core.prepare import prepare

    root = tmp_path_factory.mktemp("demo60")
    raw = write_demo_csv(root / "raw.csv.gz", n=60, seed=1)
    prepare([raw], root / "data", workers=1, split=(0.8, 0.1, 0.1))
    return root / "data"
