"""Generation throughput: the naive loop against the batched, cached sampler, same model and prompts.

The naive loop is what a straightforward implementation does: one structure at a time,
no key/value cache, a full forward pass over the whole sequence for every new token and
a host round-trip per token. Both sample with the same temperature and top-k.

Prints one JSON line. With ``--ckpt`` the model is a trained checkpoint and samples end at
their own ``<eos>``; without it the model has random weights of the named size and
every sample runs to ``--max-tokens`` new tokens (set it to the typical CIF length).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from crystallm_core.model import GPT, named_config
from crystallm_core.sampler import KV_CACHE_CHOICES, Sampler, SamplingParams
from crystallm_core.tokens import TokenData
from crystallm_core.vocab import get_vocab


@torch.no_grad()
def naive_generate(model: GPT, prompt: list[int], params: SamplingParams, eos: int, gen: torch.Generator) -> int:
    """One structure, full forward per token; returns the number of new tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    for n in range(params.max_tokens):
        logits = model(ids)[0][0, -1].float() / params.temperature
        if params.top_k:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        if int(nxt) == eos:  # host round-trip, as in a plain Python loop
            return n
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return params.max_tokens


def prompts_from(data_dir: str | None, vocab, n: int) -> list[list[int]]:
    """data_ lines of a prepared data set (test, else val, else train), cycled to ``n``."""
    if data_dir is None:
        base = [vocab.encode(f"data_{f}\n") for f in ("Ba1Ti1O3", "Sr1Ti1O3", "Ca1Zr1O3", "K1Nb1O3", "La1Al1O3")]
    else:
        for split in ("test", "val", "train"):
            try:
                data = TokenData(data_dir, split, vocab)
                break
            except ValueError:
                continue
        newline = vocab.index["\n"]
        base = []
        for i in range(min(len(data), 4096)):
            ids = data.cif(i).tolist()
            base.append(ids[: ids.index(newline) + 1])
    return [base[i % len(base)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="small", help="tiny | small | large (random weights) unless --ckpt")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--data", default=None, help="prepared data set to take prompts from")
    ap.add_argument("--structures", type=int, default=8192, help="structures for the batched sampler")
    ap.add_argument("--naive-structures", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--max-len", type=int, default=None, help="cache length (default prompt + max tokens)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto", help="key/value cache type")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    vocab = get_vocab()
    if args.ckpt:
        from crystallm_core.checkpoint import load_model

        model, vocab, _ = load_model(args.ckpt, device)
        name = args.ckpt
    else:
        torch.manual_seed(0)
        model = GPT(named_config(args.model, len(vocab))).to(device).eval()
        name = args.model
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
        torch.backends.cuda.matmul.allow_tf32 = True
    eos = vocab.eos_id if args.ckpt else -1  # random weights: every sample runs to max_tokens
    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens, seed=0, ignore_eos=not args.ckpt
    )
    prompts = prompts_from(args.data, vocab, args.structures)
    max_len = args.max_len or (max(map(len, prompts)) + args.max_tokens + 1)

    naive_prompts = prompts[: args.naive_structures]
    naive_s, naive_tokens = 0.0, 0
    if naive_prompts:  # --naive-structures 0 skips the baseline (a run beside one that measured it)
        gen = torch.Generator(device=device).manual_seed(0)
        naive_generate(model, naive_prompts[0], SamplingParams(max_tokens=8, top_k=args.top_k), eos, gen)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        naive_tokens = sum(naive_generate(model, p, params, eos, gen) for p in naive_prompts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        naive_s = time.perf_counter() - t0

    sampler = Sampler(
        model,
        vocab,
        batch_size=args.batch_size,
        max_len=max_len,
        cuda_graph=False if args.no_graph else None,
        kv_cache=args.kv_cache,
    )
    sampler.generate(prompts[: args.batch_size], params)  # warm-up: capture, kernels, allocator
    _, stats = sampler.generate(prompts, params)

    naive_rate = len(naive_prompts) / naive_s if naive_s else None
    out = {
        "bench": "sample",
        "model": name,
        "params_m": round(model.num_params() / 1e6, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "cache_len": max_len,
        "cuda_graph": sampler.use_graph,
        "kv_cache": str(sampler.cache.k.dtype).removeprefix("torch."),
        "naive": {
            "structures": len(naive_prompts),
            "structures_per_s": round(naive_rate, 3) if naive_rate else None,
            "tokens_per_s": round(naive_tokens / naive_s, 1) if naive_s else None,
        },
        "batched": {
            "structures": stats.samples,
            "structures_per_s": round(stats.samples_per_s, 1),
            "tokens_per_s": round(stats.tokens_per_s, 1),
            "mean_new_tokens": round(stats.generated_tokens / stats.samples, 1),
            "seconds": round(stats.seconds, 2),
            "peak_gpu_mem_gb": round(stats.peak_memory_bytes / 2**30, 2),
        },
        "speedup": round(stats.samples_per_s / naive_rate, 1) if naive_rate else None,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
