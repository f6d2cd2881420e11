"""A small trained model for search tests, built once per test session.

A ``tiny`` model (short context) trained on two demo CIFs until it mostly reproduces them: its
rollouts give valid CIFs often and invalid ones sometimes, which is what the search tests need.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from crystallm_core import checkpoint
from crystallm_core.cif import canonicalize
from crystallm_core.demo import demo_structures
from crystallm_core.model import GPT, named_config
from crystallm_core.vocab import Vocabulary, get_vocab

STEPS = 80
WARMUP = 20  # without warm-up the fit at this learning rate depends on float rounding (thread count)


def training_cifs() -> list[str]:
    return [canonicalize(s).text for _, s in demo_structures(40, seed=0)[:2]]


def prompt_formula() -> str:
    """The composition of the first training CIF (what the tests search for)."""
    return training_cifs()[0].split("\n", 1)[0][len("data_") :]


def trained_tiny(directory: Path) -> Path:
    """The checkpoint in ``directory``, trained there first if it is not there yet."""
    path = directory / "tiny.pt"
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    vocab = get_vocab()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster than two contended ones
    try:
        _train(path, vocab)
    finally:
        torch.set_num_threads(threads)
    return path


def _train(path: Path, vocab: Vocabulary) -> None:
    torch.manual_seed(0)
    cfg = named_config("tiny", len(vocab), block_size=256)
    model = GPT(cfg)
    seqs = [vocab.encode(t) + [vocab.eos_id] for t in training_cifs()]
    batch = torch.full((len(seqs), max(map(len, seqs))), vocab.pad_id)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = torch.tensor(s)
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[targets == vocab.pad_id] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP))
    for _ in range(STEPS):
        logits, _ = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    checkpoint.save(path, {"model": model.state_dict(), "model_config": cfg.to_dict(), "vocab_id": vocab.id})
