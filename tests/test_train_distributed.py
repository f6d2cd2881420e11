"""Data-parallel training on the CPU (gloo), launched as CI and users launch it: torchrun subprocesses."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from crystallm_core import checkpoint, distributed
from crystallm_core.config import ConfigError
from crystallm_core.events import JsonlSink, read_events
from crystallm_core.train import TrainConfig, Trainer

# The same global batch at every world size: 4 micro-batches of 2 windows per step over all ranks
# (2 per rank at world size 2, so DDP's no_sync micro-step is exercised).
BASE = dict(
    model="tiny",
    batch_size=2,
    grad_accum=4,
    block_size=64,
    max_steps=4,
    warmup_steps=1,
    eval_interval=2,
    eval_batches=3,  # not a multiple of the world size: rank 0 computes two batches, rank 1 one
    log_interval=1,
    dropout=0.0,
)


def torchrun(data, out, nproc=2, resume=False, **overrides):
    cfg = out.parent / f"{out.name}.json"
    cfg.write_text(json.dumps({"data_dir": str(data), "out_dir": str(out), **BASE}))
    args = [f"{k}={v}" for k, v in overrides.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "crystallm_core.cli", "train", str(cfg), *args] + (["--resume"] if resume else [])
    env = {k: v for k, v in os.environ.items() if k != "CRYSTALLM_EVENTS"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(out, key):
    events = read_events(out / "metrics" / "train.jsonl")
    return [(e["step"], e["values"][key]) for e in events if e["type"] == "metric" and key in e["values"]]


def train_here(data, out, resume=False, **kw):
    """One process, in this one (no torchrun environment)."""
    with JsonlSink(out / "metrics" / "train.jsonl") as sink:
        trainer = Trainer(TrainConfig(data_dir=str(data), out_dir=str(out), **{**BASE, **kw}), resume=resume)
        trainer.run(sink)
    return trainer


def close(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)


@pytest.fixture(scope="module")
def runs(demo_small, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    train_here(demo_small, root / "one")
    torchrun(demo_small, root / "two")
    return root


def test_two_ranks_give_the_losses_of_one_rank_and_write_one_checkpoint(runs):
    one, two = runs / "one", runs / "two"
    close(metrics(two, "loss"), metrics(one, "loss"))
    close(metrics(two, "val_loss"), metrics(one, "val_loss"))
    assert [s for s, _ in metrics(two, "loss")] == [1, 2, 3, 4]  # rank 0 alone reported
    assert sorted(p.name for p in (two / "ckpts").iterdir()) == ["best.pt", "last.pt"]
    artifacts = [e for e in read_events(two / "metrics" / "train.jsonl") if e["type"] == "artifact"]
    assert len([e for e in artifacts if e["kind"] == "checkpoint"]) == len(
        [e for e in read_events(one / "metrics" / "train.jsonl") if e.get("kind") == "checkpoint"]
    )
    a, b = checkpoint.read(one / "ckpts" / "last.pt"), checkpoint.read(two / "ckpts" / "last.pt")
    assert b["world_size"] == 2 and b["step"] == 4
    assert sorted(a) == sorted(b) and sorted(a["model"]) == sorted(b["model"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6)
    assert torch.equal(a["rng"]["windows"], b["rng"]["windows"])  # every rank drew every window


def test_two_rank_checkpoint_resumes_at_one_rank_and_under_fsdp(runs, demo_small):
    """The 2-rank checkpoint loads at 1 rank with exactly its model and optimizer state; training goes on
    alike at 1 rank (plain) and at 2 ranks under FSDP2 (which gathers the same file format to rank 0)."""
    ckpt = checkpoint.read(runs / "two" / "ckpts" / "last.pt")
    for name in ("solo", "fsdp"):
        shutil.copytree(runs / "two" / "ckpts", runs / name / "ckpts")
    trainer = Trainer(TrainConfig(data_dir=str(demo_small), out_dir=str(runs / "solo"), **BASE), resume=True)
    assert trainer.step == 4
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in ckpt["model"])
    opt = trainer.opt.state_dict()
    assert opt["param_groups"] == ckpt["optimizer"]["param_groups"]
    for i, s in ckpt["optimizer"]["state"].items():
        assert all(torch.equal(opt["state"][i][n], v) for n, v in s.items())
    assert torch.equal(trainer.train_windows.gen.get_state(), ckpt["rng"]["windows"])

    train_here(demo_small, runs / "solo", resume=True, max_steps=6)
    torchrun(demo_small, runs / "fsdp", resume=True, max_steps=6, parallel="fsdp")
    close(metrics(runs / "fsdp", "loss"), metrics(runs / "solo", "loss"))
    assert [s for s, _ in metrics(runs / "solo", "loss")] == [5, 6]
    a = checkpoint.read(runs / "solo" / "ckpts" / "last.pt")
    b = checkpoint.read(runs / "fsdp" / "ckpts" / "last.pt")
    assert b["step"] == 6 and sorted(b["model"]) == sorted(a["model"])
    assert sorted(b["optimizer"]["state"]) == sorted(a["optimizer"]["state"])
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-6)


def test_parallel_and_world_settings_are_checked(demo_small, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp, got 'dpp'"):
        TrainConfig(data_dir="d", out_dir="o", parallel="dpp")
    assert distributed.from_env({}) == distributed.Dist()
    d = distributed.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (d.rank, d.world, d.local_rank, d.active, d.is_main) == (1, 2, 1, True, False)
    with pytest.raises(ValueError, match="RANK"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="cuda:LOCAL_RANK"):
        distributed.device_for("cuda:1", d)
    # A world of 2 needs grad_accum to be a multiple of 2 (checked before any process group starts).
    monkeypatch.setattr(distributed, "setup", lambda name: (d, torch.device("cpu")))
    with pytest.raises(ConfigError, match=r"grad_accum \(1\).*multiple of the world size \(2\)"):
        Trainer(TrainConfig(data_dir=str(demo_small), out_dir=str(tmp_path), model="tiny", grad_accum=1))
