import matplotlib.image
import numpy as np
import pytest

from crystallm_core.cli import main
from crystallm_core.events import JsonlSink, read_events
from crystallm_core.plots import heatmap, metrics_files, plot_training, read_series

PNG = b"\x89PNG\r\n\x1a\n"


def check_png(path) -> np.ndarray:
    """A real PNG that matplotlib reads back as an image with something drawn on it."""
    assert path.read_bytes()[:8] == PNG, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def write_training_metrics(path, steps: int = 20) -> None:
    with JsonlSink(path) as sink:
        for s in range(1, steps + 1):
            sink.metric(s, loss=5.0 / s, lr=1e-3 * min(1.0, s / 5), tokens_per_s=1000.0 + s)
            if s % 5 == 0:
                sink.metric(s, val_loss=5.5 / s)
                sink.artifact(path.parent / "ckpt.pt", "checkpoint")


def test_training_curves_are_valid_pngs(tmp_path):
    write_training_metrics(tmp_path / "metrics" / "train.jsonl")
    written = plot_training(metrics_files(tmp_path), tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "lr.png", "throughput.png"]
    for p in written:
        check_png(p)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "lr.png", "throughput.png"]


def test_only_curves_with_data_are_drawn(tmp_path):
    with JsonlSink(tmp_path / "events.jsonl") as sink:
        sink.metric(1, loss=3.0)
        sink.metric(2, loss=float("nan"))  # recorded as null: skipped, not drawn as zero
        sink.progress("train", 1, 2)
    assert [p.name for p in plot_training([tmp_path / "events.jsonl"], tmp_path / "plots")] == ["loss.png"]
    assert read_series(tmp_path / "events.jsonl") == {"loss": [(1, 3.0)]}


def test_a_step_logged_again_keeps_the_later_value(tmp_path):
    path = tmp_path / "train.jsonl"
    with JsonlSink(path) as sink:
        for s, v in ((1, 5.0), (2, 4.0), (3, 3.5), (2, 4.2), (3, 3.4), (4, 3.0)):  # resumed from step 1
            sink.metric(s, loss=v)
    assert read_series(path)["loss"] == [(1, 5.0), (2, 4.2), (3, 3.4), (4, 3.0)]


def test_plot_verb_reads_metrics_files_and_events_jsonl(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CRYSTALLM_EVENTS", raising=False)
    write_training_metrics(tmp_path / "metrics" / "train.jsonl")
    write_training_metrics(tmp_path / "events.jsonl", steps=10)
    assert metrics_files(tmp_path) == [tmp_path / "metrics" / "train.jsonl", tmp_path / "events.jsonl"]
    assert main(["plot", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "plots" / n) for n in ("loss.png", "lr.png", "throughput.png")]
    for name in ("loss.png", "lr.png", "throughput.png"):
        check_png(tmp_path / "plots" / name)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "elsewhere")]) == 0
    check_png(tmp_path / "elsewhere" / "loss.png")


def test_plot_verb_reports_artifacts_when_run_as_a_stage(tmp_path, monkeypatch):
    write_training_metrics(tmp_path / "run" / "metrics" / "train.jsonl")
    events = tmp_path / "stage" / "events.jsonl"
    monkeypatch.setenv("CRYSTALLM_EVENTS", str(events))
    assert main(["plot", str(tmp_path / "run")]) == 0
    kinds = [(e["kind"], e["path"]) for e in read_events(events)]
    assert kinds == [
        ("plot", str((tmp_path / "run" / "plots" / n).resolve())) for n in ("loss.png", "lr.png", "throughput.png")
    ]


def test_plot_verb_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics in" in capsys.readouterr().err
    with JsonlSink(tmp_path / "metrics" / "evaluate.jsonl") as sink:
        sink.metric(0, count=10)
    assert main(["plot", str(tmp_path)]) == 1
    assert "no training curves" in capsys.readouterr().err


def test_heatmap_with_missing_pairs(tmp_path):
    values = np.array([[0.5, np.nan], [np.nan, 0.1]])
    check_png(heatmap(values, ["a", "b"], ["c", "d"], "title", "nats", tmp_path / "h.png"))
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # written atomically: no temporary file left
    with pytest.raises(ValueError, match=r"values of shape \(2, 2\) for 1 x 2 labels"):
        heatmap(np.zeros((2, 2)), ["a"], ["c", "d"], "rows and labels disagree", "nats", tmp_path / "bad.png")


def test_stages_other_than_training_are_not_drawn(tmp_path):
    write_training_metrics(tmp_path / "metrics" / "train.jsonl")
    with JsonlSink(tmp_path / "metrics" / "sample.jsonl") as sink:
        sink.metric(0, samples=8, tokens_per_s=1234.0)
    plot_training(metrics_files(tmp_path), tmp_path / "plots")
    with_sample = (tmp_path / "plots" / "throughput.png").read_bytes()
    (tmp_path / "metrics" / "sample.jsonl").unlink()
    plot_training(metrics_files(tmp_path), tmp_path / "plots2")
    assert (tmp_path / "plots2" / "throughput.png").read_bytes() == with_sample
