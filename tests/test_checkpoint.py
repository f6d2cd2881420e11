"""Checkpoints and probe captures are loaded with ``weights_only``: a crafted pickle is refused before any
of it runs; checkpoints of this project, older ones included, still load."""

from __future__ import annotations

import builtins
import gzip
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from crystallm_core import checkpoint
from crystallm_core.probes import load_capture
from crystallm_core.train import rng_state, set_rng_state


class _Evil:
    """Unpickling this calls open(marker, "w"): the file appears if the loader ran it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.open, (str(self.marker), "w"))


class _Windows:
    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(3)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "x": _Evil(marker)}, path)
    with pytest.raises(checkpoint.UnsafeCheckpoint) as err:
        checkpoint.read(path)
    assert str(err.value).startswith(f"{path} is refused: it holds an object a checkpoint may not hold")
    assert "open" in str(err.value) and "could run code" in str(err.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="is refused"):  # load_model and export go through read
        checkpoint.load_model(path)
    assert not marker.exists()


def test_a_probe_capture_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    torch.save({"metadata": {}, "x": _Evil(marker)}, buf)
    path = tmp_path / "capture.pt.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    with pytest.raises(ValueError, match="is refused: it holds objects a probe capture may not hold"):
        load_capture(path)
    assert not marker.exists()


def _draws(windows: _Windows) -> tuple:
    return (
        random.random(),
        float(np.random.random()),
        torch.rand(1).item(),
        torch.randint(1000, (1,), generator=windows.gen).item(),
    )


@pytest.mark.parametrize("old", [False, True])
def test_rng_states_round_trip_and_old_numpy_states_still_load(tmp_path: Path, old: bool) -> None:
    windows = _Windows()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state(windows)
    if old:  # checkpoints written before held numpy's state as a numpy array
        state = {**state, "numpy": np.random.get_state()}
    else:
        assert isinstance(state["numpy"][1], torch.Tensor)
    want = _draws(windows)
    path = checkpoint.save(tmp_path / "c.pt", {"rng": state})
    set_rng_state(checkpoint.read(path)["rng"], windows)
    assert _draws(windows) == want
