"""Sharded runs: each part generates what the whole run generates for its items, and the merge of the parts
is the whole run's output (same files, same contents, same figures)."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
import torch

from crystallm_core.cli import main
from crystallm_core.events import JsonlSink
from crystallm_core.model import GPT, named_config
from crystallm_core.sampler import Sampler, SamplingParams
from crystallm_core.shards import Shard, merge_csp, parse_shard
from crystallm_core.train import TrainConfig, Trainer
from crystallm_core.vocab import get_vocab
from tests.conftest import PEROV_TEST


@pytest.fixture(scope="module")
def ckpt(demo_small, tmp_path_factory) -> Path:
    """A tiny model after a few steps: it writes CIF-like text, enough for the samples to differ by seed."""
    out = tmp_path_factory.mktemp("shards-run")
    cfg = TrainConfig(data_dir=str(demo_small), out_dir=str(out), model="tiny", max_steps=4,
                      batch_size=2, block_size=128, eval_interval=4, eval_batches=1)  # fmt: skip
    with JsonlSink(out / "events.jsonl") as sink:
        Trainer(cfg).run(sink)
    return out / "ckpts" / "last.pt"


def test_shard_parts_cover_the_units_in_order():
    for total in (0, 1, 5, 17):
        for count in (1, 2, 3, 7):
            parts = [Shard(i, count).part(total) for i in range(count)]
            assert [k for p in parts for k in p] == list(range(total))
    assert parse_shard("2/3") == Shard(2, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(argparse.ArgumentTypeError, match="--shard"):
            parse_shard(bad)


def test_an_item_s_sample_depends_on_the_seed_and_its_number_only():
    torch.manual_seed(0)
    vocab = get_vocab()
    model = GPT(named_config("tiny", len(vocab), block_size=64)).eval()
    prompts = [[5, 10 + i % 7, 20] for i in range(23)]
    params = SamplingParams(temperature=1.0, top_k=8, max_tokens=24, seed=11)
    whole = Sampler(model, vocab, batch_size=8, max_len=64, check_every=4).generate(prompts, params)[0]
    # other batch sizes, other refill rhythms, the items split in three parts
    parts = []
    for start, stop, batch in ((0, 9, 3), (9, 10, 1), (10, 23, 16)):
        sampler = Sampler(model, vocab, batch_size=batch, max_len=64, check_every=7)
        parts += sampler.generate(prompts[start:stop], params, first_item=start)[0]
    assert parts == whole
    other = Sampler(model, vocab, batch_size=8, max_len=64).generate(
        prompts, SamplingParams(**{**vars(params), "seed": 12})
    )
    assert other[0] != whole


def _run(*argv: str) -> None:
    assert main([*argv]) == 0


def test_sharded_sample_merges_into_the_unsharded_files(ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTALLM_EVENTS", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Ba1Ti1O3\nSr1Ti1O3\nCa1Zr1O3 Pm-3m\n")
    common = ["sample", "--model", str(ckpt), "--prompts", str(prompts), "--num-samples", "3", "--max-tokens", "40",
              "--seed", "5", "--device", "cpu"]  # fmt: skip
    _run(*common, "--out", str(tmp_path / "whole"))
    for i in range(2):
        _run(*common, "--shard", f"{i}/2", "--out", str(tmp_path / f"part{i}"))
    _run("merge", "sample", str(tmp_path / "part0"), str(tmp_path / "part1"), "--out", str(tmp_path / "merged"))
    whole = {f.name: f.read_bytes() for f in (tmp_path / "whole").glob("*.cif")}
    merged = {f.name: f.read_bytes() for f in (tmp_path / "merged").glob("*.cif")}
    assert len(whole) == 9 and merged == whole
    assert 0 < len(list((tmp_path / "part0").glob("*.cif"))) < 9
    # CSV outputs: the same rows in the same order
    _run(*common, "--out", str(tmp_path / "whole.csv"))
    for i in range(2):
        _run(*common, "--shard", f"{i}/2", "--out", str(tmp_path / f"part{i}.csv"))
    _run("merge", "sample", *(str(tmp_path / f"part{i}.csv") for i in range(2)), "--out", str(tmp_path / "m.csv"))
    assert (tmp_path / "m.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()


def test_sharded_evaluate_merges_into_the_unsharded_results(tmp_path, perov_rows, monkeypatch, capsys):
    monkeypatch.delenv("CRYSTALLM_EVENTS", raising=False)
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for k, row in enumerate(perov_rows[:7]):
        (cifs / f"c{k}.cif").write_text(row["cif"])
    (cifs / "c7.cif").write_text("data_garbage\n_cell_length_a 1\n")
    _run("evaluate", str(cifs), "--json", "--workers", "1", "--out", str(tmp_path / "whole.jsonl"))
    whole_summary = json.loads(capsys.readouterr().out)
    parts = []
    for i in range(3):
        parts.append(str(tmp_path / f"part{i}.jsonl"))
        _run("evaluate", str(cifs), "--json", "--workers", "1", "--shard", f"{i}/3", "--out", parts[-1])
    capsys.readouterr()
    _run("merge", "evaluate", *parts, "--out", str(tmp_path / "merged.jsonl"))
    assert json.loads(capsys.readouterr().out) == whole_summary
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert whole_summary["count"] == 8 and 0 < whole_summary["counts"]["is_valid"] < 8


def _gunzip(path: Path) -> str:
    with gzip.open(path, "rt") as fh:
        return fh.read()


def test_sharded_csp_merges_into_the_unsharded_figures(ckpt, tmp_path, monkeypatch):
    if not PEROV_TEST.exists():
        pytest.skip(f"{PEROV_TEST} is missing")
    monkeypatch.delenv("CRYSTALLM_EVENTS", raising=False)
    common = ["benchmark", "csp", "--model", str(ckpt), "--test", str(PEROV_TEST), "--n", "2", "--limit", "3",
              "--smoke", "--workers", "1", "--device", "cpu", "--seed", "3"]  # fmt: skip
    _run(*common, "--out", str(tmp_path / "whole"))
    for i in range(2):
        _run(*common, "--shard", f"{i}/2", "--out", str(tmp_path / f"part{i}"))
    _run("merge", "csp", str(tmp_path / "part0"), str(tmp_path / "part1"), "--out", str(tmp_path / "merged"))
    whole, merged = tmp_path / "whole", tmp_path / "merged"
    assert _gunzip(merged / "samples.csv.gz") == _gunzip(whole / "samples.csv.gz")
    assert (merged / "results.jsonl").read_bytes() == (whole / "results.jsonl").read_bytes()
    figures = [json.loads((d / "csp.json").read_text()) for d in (whole, merged)]
    for f in figures:
        f.pop("samples_per_s")
    assert figures[0] == figures[1] and figures[0]["structures"] == 3 and figures[0]["attempts"] == 6


def test_csp_merge_recomputes_match_rate_and_rmse_from_the_parts(tmp_path):
    """Figures with matches (a trained model is needed to get them from generation): per-structure results
    split across parts give the figures of the whole, bit for bit."""
    from crystallm_core.csp import score
    from crystallm_core.sample import Sample, write_samples
    from crystallm_core.shards import write_csp_results

    rms = [[None, 0.21], [0.3, 0.1], [None, None], [0.05, None], [0.17, 0.33]]
    results = [
        {
            "index": t,
            "formula": f"X{t}",
            "valid": [True, t % 2 == 1],
            "published_valid": [True, True],
            "rms": r,
            "timeouts": t % 3 == 0,
        }
        for t, r in enumerate(rms)
    ]
    for name, rows in (("p0", results[:2]), ("p1", results[2:])):
        part = tmp_path / name
        part.mkdir()
        write_csp_results(part / "results.jsonl", rows)
        samples = [
            Sample(f"X{r['index']}-{r['index']}-{j}", f"X{r['index']}", j, "", "cif") for r in rows for j in (0, 1)
        ]
        write_samples(samples, part / "samples.csv.gz")
        report = {"attempts": 2 * len(rows), "samples_per_s": 4.0}
        (part / "csp.json").write_text(json.dumps(report))
    figures = merge_csp([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged")
    assert (figures["published_match_rate_1"], figures["published_rmse_1"]) == score(rms, 1)
    assert figures["validity"] == 7 / 10 and figures["published_validity"] == 1.0 and figures["match_timeouts"] == 2
    ours = [[r if ok else None for r, ok in zip(row, res["valid"])] for row, res in zip(rms, results)]
    assert (figures["match_rate_n"], figures["rmse_n"]) == score(ours, 2)
    assert (figures["published_match_rate_n"], figures["published_rmse_n"]) == score(rms, 2)
    assert figures["structures"] == 5 and figures["attempts"] == 10 and figures["samples_per_s"] == 4.0
    with pytest.raises(ValueError, match="no results.jsonl"):
        merge_csp([tmp_path / "merged", tmp_path / "nowhere"], tmp_path / "again")
