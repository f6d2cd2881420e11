"""``crystallm sample``: generate CIFs for compositions with a trained model.

Writes post-processed CIFs (operators regenerated from the generated space group, the
atom-properties block removed) either as ``.cif`` files in a directory or as one
CSV(.gz) with columns id, prompt, sample, cif, ready for ``crystallm evaluate``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from crystallm_core.checkpoint import load_model
from crystallm_core.events import ProgressReporter, open_sink
from crystallm_core.postprocess import postprocess
from crystallm_core.prompts import PromptError, make_prompt, read_prompts
from crystallm_core.sampler import KV_CACHE_CHOICES, Sampler, SamplerStats, SamplingParams
from crystallm_core.shards import add_shard_argument
from crystallm_core.train import resolve_device


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str
    index: int
    raw: str  # decoded model output
    cif: str  # post-processed


def load_for_inference(ckpt: str | Path, device: str = "auto"):  # noqa: ANN201 (tuple of model, vocab, ckpt)
    """Model in bf16 on CUDA (half the cache and weight traffic), float32 on CPU."""
    dev = resolve_device(device)
    model, vocab, meta = load_model(ckpt, dev)
    if dev.type == "cuda":
        model = model.to(torch.bfloat16)
    return model, vocab, meta


def generate(
    sampler: Sampler,
    prompts: list[tuple[str, str | None]],
    num_samples: int,
    params: SamplingParams,
    on_progress: Callable[[int, int], None] | None = None,
    items: range | None = None,
    first_prompt: int = 0,
) -> tuple[list[Sample], SamplerStats]:
    """``num_samples`` completions of each (composition, space group) prompt; item ``k`` is sample
    ``k % num_samples`` of prompt ``k // num_samples``; ``on_progress(finished, total)`` as samples finish. A
    part of a larger run gives ``items`` (default: all of ``prompts``), and ``first_prompt``, the number of
    ``prompts[0]`` in the whole run: each item comes out as in the whole run."""
    vocab = sampler.vocab
    texts = [make_prompt(comp, sg) for comp, sg in prompts]
    encoded = [vocab.encode(t) for t in texts]
    if items is None:
        items = range(first_prompt * num_samples, (first_prompt + len(texts)) * num_samples)
    requests = [encoded[k // num_samples - first_prompt] for k in items]
    outputs, stats = sampler.generate(requests, params, on_progress, first_item=items.start)
    samples = []
    for k, ids in zip(items, outputs):
        i, j = divmod(k, num_samples)
        raw = vocab.decode(ids)
        comp = texts[i - first_prompt].split("\n", 1)[0][len("data_") :]
        prompt = prompts[i - first_prompt][0]
        samples.append(Sample(id=f"{comp}-{i}-{j}", prompt=prompt, index=j, raw=raw, cif=postprocess(raw)))
    return samples, stats


def write_samples(samples: list[Sample], out: Path) -> Path:
    if out.name.endswith((".csv", ".csv.gz")):
        out.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if out.name.endswith(".gz") else open
        with opener(out, "wt", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "prompt", "sample", "cif"])
            for s in samples:
                w.writerow([s.id, s.prompt, s.index, s.cif])
        return out
    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        (out / f"{s.id}.cif").write_text(s.cif, encoding="utf-8")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint (.pt)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="composition, e.g. Na2Cl2 (cell counts)")
    src.add_argument("--prompts", help="file of 'COMPOSITION [SPACEGROUP]' lines")
    p.add_argument("--spacegroup", help="space group for --prompt (symbol or number)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample within the top probability mass P only")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens generated per sample at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="slots generated together (default: 1024 GPU, 32 CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument(
        "--kv-cache", choices=KV_CACHE_CHOICES, default="auto", help="key/value cache type (auto: fp8 on a GPU)"
    )
    p.add_argument("--out", required=True, help="directory of .cif files, or FILE.csv[.gz]")
    p.add_argument("--smoke", action="store_true", help="two samples of at most 64 tokens per prompt")
    add_shard_argument(p, "(prompt, sample) items, prompt by prompt")


def run(args: argparse.Namespace) -> int:
    try:
        prompts = [(args.prompt, args.spacegroup)] if args.prompt else read_prompts(args.prompts)
        for comp, sg in prompts:
            make_prompt(comp, sg)
        n = min(args.num_samples, 2) if args.smoke else args.num_samples
        if n < 1:
            raise ValueError(f"--num-samples must be >= 1, got {n}")
        params = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_tokens=min(args.max_tokens, 64) if args.smoke else args.max_tokens,
            seed=args.seed,
        )
        model, vocab, _ = load_for_inference(args.model, args.device)
    except (PromptError, ValueError, FileNotFoundError) as e:
        print(f"crystallm sample: {e}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    batch = args.batch_size or (1024 if device.type == "cuda" else 32)
    items = range(n * len(prompts)) if args.shard is None else args.shard.part(n * len(prompts))
    sampler = Sampler(
        model,
        vocab,
        batch_size=max(1, min(batch, len(items))),
        max_len=model.cfg.block_size,
        kv_cache=args.kv_cache,
    )
    out = Path(args.out)
    with open_sink(out.parent if out.suffix in (".csv", ".gz") else out) as sink:
        with ProgressReporter(sink, "sample", len(items)) as progress:
            progress.update(0)  # the bar shows from the start, before the first sample ends
            samples, stats = generate(sampler, prompts, n, params, progress.update, items)
        out = write_samples(samples, out)
        sink.metric(0, samples=stats.samples, samples_per_s=stats.samples_per_s, tokens_per_s=stats.tokens_per_s)
        sink.artifact(out, "samples")
    rate = f"{stats.samples_per_s:.1f}/s, {stats.tokens_per_s:,.0f} tok/s"
    print(f"{stats.samples} samples in {stats.seconds:.1f} s ({rate}) -> {out}")
    return 0
