import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crystallm_core import checkpoint, probes
from crystallm_core.cli import main
from crystallm_core.config import ConfigError
from crystallm_core.events import JsonlSink, read_events
from crystallm_core.probes import CaptureWriteError, load_capture, parse_probes, resolve_positions
from crystallm_core.tokens import TokenData
from crystallm_core.train import TrainConfig, Trainer, load_config

CONTEXT = 64
METADATA_KEYS = {
    "format",
    "probe",
    "step",
    "epoch",
    "tokens_seen",
    "source_modules",
    "target_modules",
    "data_set",
    "data_dir",
    "split",
    "vocab_id",
    "model",
    "context",
    "subset_size",
    "windows",
    "positions",
    "dtype",
    "shapes",
}


def probe(**kw) -> dict:
    return {"name": "p", "source_modules": ["blocks.0", "blocks.0.attn"], "target_modules": ["blocks.1.mlp"], **kw}


def config(data, out, probes, **kw) -> TrainConfig:
    base = dict(
        data_dir=str(data),
        out_dir=str(out),
        model="tiny",
        batch_size=2,
        block_size=CONTEXT,
        max_steps=4,
        warmup_steps=1,
        eval_interval=2,
        eval_batches=1,
        log_interval=2,
        probes=probes,
    )
    base.update(kw)
    return TrainConfig(**base)


def train(cfg: TrainConfig) -> Trainer:
    trainer = Trainer(cfg)
    with JsonlSink(trainer.layout.metrics_file("train")) as sink:
        trainer.run(sink)
    return trainer


def all_hooks(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@pytest.fixture(scope="module")
def probed_run(demo_small, tmp_path_factory):
    """Four steps of tiny with a probe captured at steps 2 and 4 (8 windows: more than the 6 validation CIFs)."""
    out = tmp_path_factory.mktemp("probed")
    spec = probe(subset_size=8, positions=[0, "10:20:5", -1])
    trainer = train(config(demo_small, out, [spec]))
    return trainer, out


def test_a_probe_writes_the_documented_files(probed_run, demo_small):
    trainer, out = probed_run
    assert sorted(p.name for p in (out / "probes" / "p").iterdir()) == ["eval_2.pt.gz", "eval_4.pt.gz"]
    data = load_capture(out / "probes" / "p" / "eval_4.pt.gz")
    assert set(data) == {"metadata", "source_activations", "target_activations", "labels"}
    meta = data["metadata"]
    assert set(meta) == METADATA_KEYS
    positions = [0, 10, 15, CONTEXT - 1]
    assert meta["positions"] == positions
    assert (meta["probe"], meta["step"], meta["dtype"], meta["context"]) == ("p", 4, "float16", CONTEXT)
    assert meta["tokens_seen"] == 4 * 2 * CONTEXT
    train_tokens = TokenData(demo_small, "train", trainer.vocab).tokens
    assert meta["epoch"] == pytest.approx(meta["tokens_seen"] / len(train_tokens))
    assert meta["vocab_id"] == trainer.vocab.id and meta["data_dir"] == str(demo_small.resolve())
    assert meta["source_modules"] == ["blocks.0", "blocks.0.attn"] and meta["target_modules"] == ["blocks.1.mlp"]
    assert list(data["source_activations"]) == ["blocks.0", "blocks.0.attn"]
    assert list(data["target_activations"]) == ["blocks.1.mlp"]
    width = trainer.model_cfg.n_embd
    for group in ("source_activations", "target_activations"):
        for name, t in data[group].items():
            assert t.shape == (8, len(positions), width) and t.dtype == torch.float16
            assert meta["shapes"][name] == [8, len(positions), width]
    # The labels are the validation tokens at the kept positions of windows starting at the listed CIFs.
    val = TokenData(demo_small, "val", trainer.vocab)
    assert len(meta["windows"]) == 8 and sorted(set(meta["windows"])) == list(range(len(val)))  # CIFs repeat
    expected = [[int(val.tokens[int(val.starts[c]) + p]) for p in positions] for c in meta["windows"]]
    assert data["labels"].dtype == torch.int64 and data["labels"].tolist() == expected


def test_activations_are_the_models_outputs_at_that_step(probed_run):
    """The last capture (step 4) holds what the step-4 checkpoint computes on the same windows."""
    _, out = probed_run
    data = load_capture(out / "probes" / "p" / "eval_4.pt.gz")
    model, vocab, _ = checkpoint.load_model(out / "ckpts" / "last.pt")
    seen = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
        for name in ("blocks.0", "blocks.1.mlp")
    ]
    windows = [data["metadata"]["windows"]]
    val = TokenData(data["metadata"]["data_dir"], "val", vocab)
    x = torch.tensor(
        np.stack([val.tokens[int(val.starts[c]) + np.arange(CONTEXT)].astype(np.int64) for c in windows[0]])
    )
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    pos = data["metadata"]["positions"]
    torch.testing.assert_close(
        data["source_activations"]["blocks.0"].float(), seen["blocks.0"][:, pos], atol=2e-3, rtol=2e-3
    )
    torch.testing.assert_close(
        data["target_activations"]["blocks.1.mlp"].float(), seen["blocks.1.mlp"][:, pos], atol=2e-3, rtol=2e-3
    )


def test_every_capture_sees_the_same_windows(probed_run):
    _, out = probed_run
    a = load_capture(out / "probes" / "p" / "eval_2.pt.gz")
    b = load_capture(out / "probes" / "p" / "eval_4.pt.gz")
    assert a["metadata"]["windows"] == b["metadata"]["windows"]
    assert torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["source_activations"]["blocks.0"], b["source_activations"]["blocks.0"])  # it learned


def test_captures_are_reported_as_events_and_in_the_log(probed_run, capsys):
    _, out = probed_run
    events = read_events(out / "metrics" / "train.jsonl")
    probes = [e["path"] for e in events if e["type"] == "artifact" and e["kind"] == "probe"]
    assert probes == [str(out / "probes" / "p" / "eval_2.pt.gz"), str(out / "probes" / "p" / "eval_4.pt.gz")]
    costs = [e for e in events if e["type"] == "metric" and "probe_seconds" in e["values"]]
    assert [e["step"] for e in costs] == [2, 4] and all(e["values"]["probe_seconds"] > 0 for e in costs)
    total = [e["values"] for e in events if e["type"] == "metric" and "probe_seconds_total" in e["values"]]
    assert len(total) == 1 and total[0]["train_seconds"] > 0
    assert total[0]["probe_seconds_total"] == pytest.approx(sum(e["values"]["probe_seconds"] for e in costs))


def test_the_log_reports_the_cost_of_probing(demo_small, tmp_path, capsys):
    train(config(demo_small, tmp_path, [probe(subset_size=2)], max_steps=2))
    out = capsys.readouterr().out
    line = r"step 2: probe p: 2 windows x 64 positions x 3 modules -> probes/p/eval_2\.pt\.gz \(\d+\.\d MiB, "
    assert re.search(line + r"\d+\.\d\d s; written in \d+\.\d\d s in the background\)", out)
    assert re.search(r"probes: [\d.]+ s capturing vs [\d.]+ s training \(.*\); [\d.]+ s writing in the background", out)


def test_a_capture_never_holds_more_than_its_subset(demo_small, tmp_path):
    trainer = Trainer(config(demo_small, tmp_path, [probe(subset_size=5)], batch_size=2))
    rows: list[int] = []
    trainer.model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    p = trainer.prober.probes[0]
    cap = trainer.prober.capture(p, tmp_path / "c.pt.gz", step=0, tokens_seen=0, epoch=0.0)
    assert rows == [2, 2, 1]  # the 5 subset windows, in batches of batch_size, nothing else
    assert cap.shape == (5, CONTEXT)
    trainer.prober.wait()
    assert trainer.prober.written() == [cap] and cap.bytes == cap.path.stat().st_size
    assert all(t.shape[0] == 5 for t in load_capture(cap.path)["source_activations"].values())


class ProbeFilesChecked(JsonlSink):
    """An events file that checks each probe artifact is in place when its event is emitted."""

    def artifact(self, path, kind):
        assert kind != "probe" or Path(path).is_file(), path
        super().artifact(path, kind)


def test_captures_are_written_while_training_goes_on_and_all_on_disk_at_the_end(demo_small, tmp_path, monkeypatch):
    trainer = Trainer(config(demo_small, tmp_path, [probe(subset_size=2)], max_steps=6))
    write = probes.write_capture
    daemons = []

    def slow_write(path, payload):
        daemons.append(threading.current_thread().daemon)
        if path.name == "eval_2.pt.gz":  # held until training has moved on: a synchronous write would time out
            deadline = time.monotonic() + 60
            while trainer.step < 3:
                assert time.monotonic() < deadline, "training did not go on while a capture was written"
                time.sleep(0.01)
        if path.name == "eval_6.pt.gz":  # the last one: the run must wait for it, and say so
            time.sleep(1.0)
        return write(path, payload)

    monkeypatch.setattr(probes, "write_capture", slow_write)
    with ProbeFilesChecked(trainer.layout.metrics_file("train")) as sink:
        trainer.run(sink)
    names = ["eval_2.pt.gz", "eval_4.pt.gz", "eval_6.pt.gz"]
    assert sorted(p.name for p in (tmp_path / "probes" / "p").iterdir()) == names  # no temporary file left
    assert [load_capture(tmp_path / "probes" / "p" / n)["metadata"]["step"] for n in names] == [2, 4, 6]
    assert daemons == [True] * 3
    events = read_events(tmp_path / "metrics" / "train.jsonl")
    assert [Path(e["path"]).name for e in events if e.get("kind") == "probe"] == names
    costs = {e["step"]: e["values"]["probe_seconds"] for e in events if "probe_seconds" in e.get("values", {})}
    assert list(costs) == [2, 4, 6] and costs[6] >= 0.5  # the wait for the last write (less checkpointing)
    total = [e["values"] for e in events if "probe_seconds_total" in e.get("values", {})]
    assert total[0]["probe_seconds_total"] == pytest.approx(sum(costs.values()))
    assert total[0]["probe_write_seconds_total"] >= 1.0


def test_a_failing_write_fails_the_run(demo_small, tmp_path, monkeypatch, capsys):
    def full_disk(path, payload):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(probes, "write_capture", full_disk)
    message = r"probe p: could not write its step-2 capture .*eval_2\.pt\.gz: OSError: \[Errno 28\] No space left"
    with pytest.raises(CaptureWriteError, match=message):
        train(config(demo_small, tmp_path / "direct", [probe(subset_size=2)]))
    events = read_events(tmp_path / "direct" / "metrics" / "train.jsonl")
    assert not [e for e in events if e.get("kind") == "probe" or "probe_seconds_total" in e.get("values", {})]
    cfg = tmp_path / "train.json"
    run = {"data_dir": str(demo_small), "out_dir": str(tmp_path / "cli"), "model": "tiny", "max_steps": 2}
    cfg.write_text(json.dumps({**run, "eval_interval": 2, "block_size": CONTEXT, "probes": [probe(subset_size=2)]}))
    assert main(["train", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert re.search("crystallm train: " + message, captured.err) and "done:" not in captured.out


def test_a_capture_lost_with_the_run_is_taken_again_on_resume(demo_small, tmp_path, capsys):
    """``last`` may land before its step's capture; a resumed run takes a missing one from the checkpoint."""
    cfg = config(demo_small, tmp_path, [probe(subset_size=2)], max_steps=6)
    with JsonlSink(tmp_path / "events.jsonl") as sink:
        Trainer(cfg).run(sink, stop_at=4)
    lost = tmp_path / "probes" / "p" / "eval_4.pt.gz"
    before = load_capture(lost)
    lost.unlink()
    with JsonlSink(tmp_path / "events.jsonl") as sink:
        Trainer(cfg, resume=True).run(sink)
    assert "step 4: probe captures of the checkpoint were missing; taken again" in capsys.readouterr().out
    assert sorted(p.name for p in lost.parent.iterdir()) == ["eval_2.pt.gz", "eval_4.pt.gz", "eval_6.pt.gz"]
    after = load_capture(lost)
    assert after["metadata"] == before["metadata"]
    for group in ("source_activations", "target_activations"):
        assert all(torch.equal(after[group][m], before[group][m]) for m in before[group])
    steps = [e["path"] for e in read_events(tmp_path / "events.jsonl") if e.get("kind") == "probe"]
    assert [Path(p).name for p in steps] == ["eval_2.pt.gz", "eval_4.pt.gz", "eval_4.pt.gz", "eval_6.pt.gz"]


def test_no_hook_is_registered_during_training_steps(demo_small, tmp_path):
    trainer = Trainer(config(demo_small, tmp_path, [probe(subset_size=2)]))
    model = trainer.model
    assert all_hooks(model) == []  # the module check at start left nothing behind
    seen: list[tuple[bool, list[str]]] = []  # (training mode, hooked modules) at every forward pass
    forward = model.forward
    model.forward = lambda *a, **k: (seen.append((model.training, all_hooks(model))), forward(*a, **k))[1]
    with JsonlSink(tmp_path / "events.jsonl") as sink:
        trainer.run(sink)
    in_steps = [hooks for training, hooks in seen if training]
    assert len(in_steps) == 4 and all(h == [] for h in in_steps)
    hooked = [hooks for training, hooks in seen if hooks]
    assert hooked and all(h == ["blocks.0", "blocks.0.attn", "blocks.1.mlp"] for h in hooked)  # captures only
    assert all_hooks(model) == []


def test_unknown_module_fails_before_training(demo_small, tmp_path, capsys):
    bad = probe(target_modules=["blocks.9.mlp"])
    with pytest.raises(
        ConfigError,
        match=r"probe 'p'\.target_modules: unknown module\(s\) blocks\.9\.mlp; valid modules: .*blocks\.1\.mlp",
    ):
        Trainer(config(demo_small, tmp_path, [bad]))
    cfg = tmp_path / "train.json"
    cfg.write_text(
        json.dumps({"data_dir": str(demo_small), "out_dir": str(tmp_path / "run"), "model": "tiny", "probes": [bad]})
    )
    assert main(["train", str(cfg)]) == 2
    assert "unknown module(s) blocks.9.mlp" in capsys.readouterr().err
    assert not (tmp_path / "run" / "ckpts").exists() and not (tmp_path / "ckpts").exists()


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        (["pos_emb"], r"module 'pos_emb' returns \(3, 128\), not a \(batch, tokens, width\) tensor"),
        (["blocks"], r"module 'blocks' ran 0 times in one forward pass"),
    ],
)
def test_modules_without_a_token_output_are_refused_at_start(demo_small, tmp_path, modules, message):
    with pytest.raises(ConfigError, match=message):
        Trainer(config(demo_small, tmp_path, [probe(source_modules=modules)]))


def test_a_probe_needs_a_validation_split(demo8, tmp_path):
    with pytest.raises(ConfigError, match="probe 'p': needs a validation split"):
        Trainer(config(demo8, tmp_path, [probe()]))


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ([probe(subset=4)], r"probe 'p' \(probes\[0\]\): unknown key\(s\) subset; valid keys: name, source_modules"),
        (
            [{"name": "p", "source_modules": ["ln_f"]}],
            r"probe 'p' \(probes\[0\]\): missing required key\(s\) target_modules",
        ),
        ([probe(dtype="int8")], r"probe 'p' \(probes\[0\]\)\.dtype: 'int8' is not one of float16, bfloat16, float32"),
        ([probe(positions="1:5:0")], r"\.positions: slice '1:5:0' has a step of 0"),
        ([probe(positions=["a"])], r"\.positions: 'a' is neither an integer nor a 'start:stop:step' slice"),
        ([probe(positions=[])], r"\.positions: an empty list selects no position"),
        ([probe(subset_size=0)], r"\.subset_size: expected a positive integer, got 0"),
        ([probe(save_every_n_evals=True)], r"\.save_every_n_evals: expected a positive integer, got True"),
        ([probe(source_modules=[])], r"\.source_modules: expected a non-empty list of module names"),
        ([probe(name="a/b")], r"probes\[0\]\)\.name: probe name 'a/b' must be"),
        ([probe(), probe()], r"probe 'p' \(probes\[1\]\): another probe has the same name"),
        (["p"], r"probes\[0\]: expected a mapping"),
        ({"name": "p"}, r"probes: expected a list"),
    ],
)
def test_bad_probe_configs_name_the_probe_and_the_key(tmp_path, probes, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data_dir": "d", "out_dir": "o", "probes": probes}))
    with pytest.raises(ConfigError, match=f"train config {re.escape(str(path))}.*{message}"):
        load_config(str(path), [], False)


def test_probe_defaults_are_recorded_in_the_config():
    cfg = TrainConfig(data_dir="d", out_dir="o", probes=[probe()])
    assert cfg.probes == [
        {
            "name": "p",
            "source_modules": ["blocks.0", "blocks.0.attn"],
            "target_modules": ["blocks.1.mlp"],
            "save_every_n_evals": 1,
            "subset_size": 32,
            "positions": None,
            "dtype": "float16",
        }
    ]
    assert parse_probes(cfg.probes)[0].modules == ["blocks.0", "blocks.0.attn", "blocks.1.mlp"]
    smoked = cfg.smoked()
    assert smoked.probes[0]["subset_size"] == 4 and cfg.probes[0]["subset_size"] == 32


def test_positions_selection():
    assert resolve_positions(None, 8) == list(range(8))
    assert resolve_positions((0, -1, "2:6:2"), 8) == [0, 2, 4, 7]
    assert resolve_positions(("::3", 3), 10) == [0, 3, 6, 9]
    assert resolve_positions(("-3:",), 10) == [7, 8, 9]
    assert resolve_positions(("5:",), 1024) == list(range(5, 1024))
    with pytest.raises(ValueError, match="position 300 is outside the context of 256 tokens"):
        resolve_positions((0, 300), 256)
    assert resolve_positions((0, 300), 256, drop_outside=True) == [0]  # smoke runs shorten the context
    with pytest.raises(ValueError, match="selects no position"):
        resolve_positions(("8:",), 8)
    assert parse_probes([probe(positions="7")])[0].positions == (7,)
    assert parse_probes([probe(positions="all")])[0].positions is None


def test_save_every_n_evals_and_the_last_evaluation(demo_small, tmp_path):
    train(config(demo_small, tmp_path, [probe(subset_size=1, save_every_n_evals=2, dtype="bfloat16")], max_steps=7))
    # Validations at steps 2, 4, 6 and 7 (the last): the 2nd, the 4th... and the last are captured.
    assert sorted(p.name for p in (tmp_path / "probes" / "p").iterdir()) == ["eval_4.pt.gz", "eval_7.pt.gz"]
    data = load_capture(tmp_path / "probes" / "p" / "eval_7.pt.gz")
    assert data["source_activations"]["blocks.0"].dtype == torch.bfloat16 and data["metadata"]["dtype"] == "bfloat16"


def test_probes_off_adds_nothing(demo_small, tmp_path):
    trainer = train(config(demo_small, tmp_path, []))
    assert trainer.prober is None and not (tmp_path / "probes").exists()
    events = read_events(tmp_path / "metrics" / "train.jsonl")
    assert not [e for e in events if e.get("kind") == "probe" or any("probe" in k for k in e.get("values", {}))]


def test_captures_feed_the_analysis(probed_run, monkeypatch):
    """The files the trainer writes are what `crystallm probes analyze` reads (ΦID replaced by a stand-in)."""
    from crystallm_core import analysis

    _, out = probed_run
    stand_in = lambda x, y: dict.fromkeys(analysis.ATOMS, float(np.corrcoef(x, y)[0, 1]))
    monkeypatch.setattr(analysis, "load_phiid", lambda tau, redundancy: stand_in)
    assert main(["probes", "analyze", str(out), "--pairs", "all"]) == 0
    table = json.loads((out / "plots" / "p" / "phiid.json").read_text())
    assert [c["step"] for c in table["captures"]] == [2, 4]
    assert {(r["source"], r["target"]) for r in table["mean"]} == {
        ("blocks.0", "blocks.1.mlp"),
        ("blocks.0.attn", "blocks.1.mlp"),
    }
