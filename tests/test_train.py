import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crystallm_core import checkpoint
from crystallm_core.config import ConfigError
from crystallm_core.events import read_events
from crystallm_core.sampler import Sampler, SamplingParams
from crystallm_core.tokens import TokenData
from crystallm_core.train import TrainConfig, Trainer, load_config, lr_factor
from crystallm_core.vocab import VocabError


def config(data, out, **kw) -> TrainConfig:
    base = dict(
        data_dir=str(data),
        out_dir=str(out),
        model="tiny",
        batch_size=4,
        block_size=128,
        max_steps=12,
        warmup_steps=2,
        eval_interval=6,
        eval_batches=2,
        log_interval=1,
        dropout=0.1,
    )
    base.update(kw)
    return TrainConfig(**base)


def events_file(out):
    """Where ``crystallm train`` writes its events when CRYSTALLM_EVENTS is not set (the layout's metrics file)."""
    return out / "metrics" / "train.jsonl"


def losses(out) -> list[tuple[int, float]]:
    return [
        (e["step"], e["values"]["loss"])
        for e in read_events(events_file(out))
        if e["type"] == "metric" and "loss" in e["values"]
    ]


def test_resume_gives_the_same_loss_curve(demo_small, tmp_path):
    """12 steps straight equal 6 steps, a fresh process-like restart from ckpts/last.pt, then 6 more."""
    from crystallm_core.events import JsonlSink

    straight = tmp_path / "straight"
    with JsonlSink(events_file(straight)) as sink:
        Trainer(config(demo_small, straight)).run(sink)
    split = tmp_path / "split"
    with JsonlSink(events_file(split)) as sink:
        Trainer(config(demo_small, split)).run(sink, stop_at=6)
    with JsonlSink(events_file(split)) as sink:
        Trainer(config(demo_small, split), resume=True).run(sink)
    assert losses(split) == losses(straight)
    assert len(losses(straight)) == 12
    a = checkpoint.read(straight / "ckpts" / "last.pt")["model"]
    b = checkpoint.read(split / "ckpts" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_overfits_eight_structures_until_greedy_reproduces_one(demo8, tmp_path):
    from crystallm_core.events import JsonlSink

    cfg = config(
        demo8,
        tmp_path,
        block_size=256,
        batch_size=8,
        max_steps=200,
        warmup_steps=10,
        lr=3e-3,
        min_lr=3e-4,
        weight_decay=0.0,
        dropout=0.0,
        eval_interval=200,
        log_interval=50,
    )
    with JsonlSink(events_file(tmp_path)) as sink:
        Trainer(cfg).run(sink)
    model, vocab, _ = checkpoint.load_model(tmp_path / "ckpts" / "last.pt")
    data = TokenData(demo8, "train", vocab)
    truth = [data.decode(i) for i in range(len(data))]
    prompts = [vocab.encode(t.split("\n", 1)[0] + "\n") for t in truth]
    out, _ = Sampler(model, vocab, batch_size=8, max_len=256).generate(
        prompts, SamplingParams(temperature=0, max_tokens=250)
    )
    reproduced = [vocab.decode(o) == t for o, t in zip(out, truth)]
    assert any(reproduced), [vocab.decode(o)[:200] for o in out]


def test_checkpoint_holds_everything_and_is_atomic(demo_small, tmp_path):
    from crystallm_core.events import JsonlSink

    with JsonlSink(events_file(tmp_path)) as sink:
        Trainer(config(demo_small, tmp_path, max_steps=6)).run(sink)
    ckpt = checkpoint.read(tmp_path / "ckpts" / "best.pt")
    for key in ("model", "optimizer", "scheduler", "step", "rng", "config", "model_config", "vocab_id", "n_params"):
        assert key in ckpt
    assert ckpt["vocab_id"].startswith("cif-v1-")
    assert not [p for p in (tmp_path / "ckpts").iterdir() if p.name.startswith(".")]
    kinds = {e["kind"] for e in read_events(events_file(tmp_path)) if e["type"] == "artifact"}
    assert kinds == {"checkpoint", "plot"}
    assert any("val_loss" in e.get("values", {}) for e in read_events(events_file(tmp_path)))


def test_checkpoint_with_another_vocabulary_is_refused(demo_small, tmp_path):
    from crystallm_core.events import JsonlSink

    with JsonlSink(events_file(tmp_path)) as sink:
        Trainer(config(demo_small, tmp_path, max_steps=2)).run(sink)
    ckpt = checkpoint.read(tmp_path / "ckpts" / "last.pt")
    ckpt["vocab_id"] = "cif-v1-0123456789ab"
    checkpoint.save(tmp_path / "other.pt", {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(VocabError, match="cif-v1-0123456789ab"):
        checkpoint.load_model(tmp_path / "other.pt")


def test_bad_configs_are_clear_errors(tmp_path, demo_small):
    path = tmp_path / "c.yaml"
    path.write_text(f"data_dir: {demo_small}\nout_dir: {tmp_path}\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown key.*batchsize.*valid keys:.*batch_size"):
        load_config(str(path), [], False)
    path.write_text(f"data_dir: {demo_small}\nout_dir: {tmp_path}\n")
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        load_config(str(path), ["max_steps=lots"], False)
    with pytest.raises(ConfigError, match="missing required key.*out_dir"):
        path.write_text(f"data_dir: {demo_small}\n")
        load_config(str(path), [], False)
    with pytest.raises(ConfigError, match="lr"):
        path.write_text(f"data_dir: {demo_small}\nout_dir: {tmp_path}\nlr: -1\n")
        load_config(str(path), [], False)


def test_learning_rate_schedule():
    cfg = TrainConfig(data_dir="d", out_dir="o", warmup_steps=10, max_steps=110, lr=1e-3, min_lr=1e-4)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_cli_smoke_run(demo_small, tmp_path):
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"data_dir": str(demo_small), "out_dir": str(tmp_path / "run"), "model": "tiny"}))
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALLM_EVENTS"}
    done = subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", "train", str(cfg), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    assert (run / "ckpts" / "last.pt").exists()
    assert checkpoint.read(run / "ckpts" / "last.pt")["step"] == 4
    # An experiment root: events in metrics/train.jsonl (no events.jsonl), curves in plots/.
    assert not (run / "events.jsonl").exists()
    assert [e["step"] for e in read_events(events_file(run)) if "loss" in e.get("values", {})] == [1, 2, 3, 4]
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert (run / "plots" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    plots = {Path(e["path"]).name for e in read_events(events_file(run)) if e.get("kind") == "plot"}
    assert plots == {"loss.png", "lr.png", "throughput.png"}
    bad = subprocess.run(
        [sys.executable, "-m", "crystallm_core.cli", "train", str(cfg), "modle=tiny"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown key(s) modle" in bad.stderr
