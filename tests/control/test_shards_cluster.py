"""A sharded ``benchmark csp`` over two real agents sharing a workdir equals the unsharded stage."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from tests.conftest import PEROV_TEST

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


@pytest.fixture
def db_url(tmp_path: Any) -> str:
    """SQLite only: sharding is the plan's and the verbs' business, the same on either database."""
    return f"sqlite:///{tmp_path / 'master.db'}"


def test_sharded_csp_over_two_agents_equals_the_unsharded_stage(cluster: Any) -> None:
    if not PEROV_TEST.exists():
        pytest.skip(f"{PEROV_TEST} is missing")
    shared = cluster.tmp / "shared-workdir"
    cluster.start_master()
    for name in ("alpha", "beta"):
        cluster.start_node(name, "--cpus", "2", "--memory", "16GiB", "--fake-gpus", "1", "--workdir", str(shared))
    cluster.wait_online("alpha", "beta")
    bench = {"test": str(PEROV_TEST), "n": 2, "limit": 3, "seed": 7, "model": "ckpts/last.pt"}
    plan = {
        "name": "sharded",
        "smoke": True,
        "shared_workdir": True,
        "resources": {"cpus": 1, "memory": "1GiB"},
        "stages": [
            {"name": "prep", "kind": "prepare", "params": {"demo": {"n": 30, "seed": 2}, "workers": 1}},
            {"name": "train", "kind": "train", "after": ["prep"],
             "params": {"model": "tiny", "max_steps": 2, "batch_size": 2, "overrides": {"block_size": 128}}},
            {"name": "whole", "kind": "benchmark", "after": ["train"], "params": bench},
            {"name": "csp", "kind": "benchmark", "after": ["train"], "params": bench, "shards": 2},
            {"name": "ev", "kind": "evaluate", "after": ["csp"], "params": {"inputs": ["samples/csp/samples.csv.gz"]}},
        ],
    }  # fmt: skip
    key = cluster.submit(plan)
    exp = cluster.wait_finished(key, timeout=300)
    assert exp["state"] == "succeeded", json.dumps(exp, indent=1)
    stages = {s["name"]: s for s in exp["stages"]}
    assert set(stages) == {"prep", "train", "whole", "csp.shard-0-of-2", "csp.shard-1-of-2", "csp", "ev"}
    assert stages["csp"]["kind"] == "merge"
    parts = [stages[f"csp.shard-{i}-of-2"] for i in range(2)]
    merged_at = min(t["time"] for t in stages["csp"]["transitions"] if t["to"] == "assigned")
    assert all(merged_at >= max(t["time"] for t in p["transitions"] if t["to"] == "succeeded") for p in parts)
    exp_dir = shared / "experiments" / key
    whole, merged = exp_dir / "samples" / "whole", exp_dir / "samples" / "csp"
    with gzip.open(whole / "samples.csv.gz", "rt") as a, gzip.open(merged / "samples.csv.gz", "rt") as b:
        assert a.read() == b.read()
    assert (merged / "results.jsonl").read_bytes() == (whole / "results.jsonl").read_bytes()
    figures = [json.loads((d / "csp.json").read_text()) for d in (whole, merged)]
    for f in figures:
        f.pop("samples_per_s")
    assert figures[0] == figures[1] and figures[0]["attempts"] == 6
    assert (exp_dir / "artifacts" / "ev" / "evaluation.jsonl").read_text().count("\n") == 6
