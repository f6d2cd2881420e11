"""Checkpoints: written atomically, loaded only with the vocabulary they were trained on.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors, plain containers and numbers, plus
exactly the few numpy types that the numpy RNG state of checkpoints written before it was stored as a
tensor holds (:data:`SAFE_GLOBALS`). A file that holds anything else (a pickle that would call a
function while loading, e.g. one crafted with ``__reduce__``) is refused, named, before any of it runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystallm_core.model import GPT, ModelConfig
from crystallm_core.vocab import VocabError, Vocabulary, vocab_for_id

FORMAT = 1


def save(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write to a temporary file in the same directory, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def _numpy_array_globals() -> list[Any]:
    """What unpickling a plain numpy array needs (numpy 1 and 2 name the reconstructor differently)."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


SAFE_GLOBALS = _numpy_array_globals()
_UNSAFE = re.compile(r"GLOBAL\s+([\w.]+)")  # torch's message: "Unsupported global: GLOBAL posix.system ..."


class UnsafeCheckpoint(ValueError):
    """A checkpoint that holds objects other than tensors, containers, numbers and numpy arrays."""


def read(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: nothing of it has run
        found = _UNSAFE.search(str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpoint(
            f"{path} is refused: it holds an object a checkpoint may not hold{what}, and loading it could run "
            "code; only tensors, numbers, strings, containers and numpy arrays are loaded. Load only "
            "checkpoints you trust, and re-save it from code you trust if it is one"
        ) from None
    except Exception as e:  # truncated or foreign files
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a crystallm checkpoint (format {FORMAT})")
    return ckpt


def load_model(
    path: str | Path, device: str | torch.device = "cpu", vocab: Vocabulary | None = None
) -> tuple[GPT, Vocabulary, dict[str, Any]]:
    """The model of a checkpoint in eval mode, with its vocabulary.

    ``vocab``, when given, must be the one the model was trained with.
    """
    ckpt = read(path)
    vocab_id = ckpt.get("vocab_id", "<none>")
    if vocab is not None and vocab.id != vocab_id:
        raise VocabError(f"checkpoint {path} was trained with vocabulary {vocab_id!r}, not {vocab.id!r}")
    model_vocab = vocab or vocab_for_id(vocab_id)
    cfg = ModelConfig(**ckpt["model_config"])
    if cfg.vocab_size != len(model_vocab):
        raise VocabError(f"checkpoint {path} has {cfg.vocab_size} token embeddings, vocabulary has {len(model_vocab)}")
    model = GPT(cfg)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), model_vocab, ckpt


def export(path: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Inference-only copy of a checkpoint: weights in ``dtype``, config and vocabulary id, no optimizer state."""
    ckpt = read(path)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    keep = ("model_config", "vocab_id", "n_params", "step", "config", "best_val_loss")
    return save(out, {"model": weights, **{k: ckpt[k] for k in keep if k in ckpt}})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint (.pt)")
    p.add_argument("out", help="file to write the inference-only copy to")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the stored weights (default bfloat16)",
    )


def run(args: argparse.Namespace) -> int:
    out = export(args.checkpoint, args.out, getattr(torch, args.dtype))
    print(f"{out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
