"""Batched generation with a preallocated key/value cache and continuous batching.

``B`` slots advance together, one token per slot per step. All state lives on the
device (token buffer, prompt lengths, positions, an active flag), so one step is a
fixed sequence of kernels that can be captured once as a CUDA graph and replayed:

* a slot still inside its prompt is fed the next prompt token (no separate prefill
  path: a refilled slot simply walks through its prompt);
* otherwise the sampled token is written and the slot finishes at ``<eos>`` or at its
  length limit.

Every ``check_every`` steps the host looks at which slots finished, copies their
tokens out and refills them with pending prompts, so the batch stays full when CIF
lengths vary.

The sampling noise is counter-based: the uniform number for (item, position, token) is a hash of
the seed, the item's number and the two, computed on the device. What an item generates therefore
depends on (seed, item number) only, never on which slot or batch it ran in, so a run split into
parts (``crystallm sample --shard``) gives the same samples as the whole.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from crystallm_core.model import GPT, KVCache
from crystallm_core.vocab import Vocabulary

_MASK = 0xFFFFFFFF
# ``--kv-cache`` choices. "auto": fp8 on a GPU (half the bytes decoding reads; on an H100 `small`
# sampled 1.48x as fast with the same validity and match rates, docs/BENCHMARKS.md), the model's own
# type elsewhere (a CPU has no fp8 arithmetic); "model": the model's type; "fp8": float8_e4m3fn.
KV_CACHE_CHOICES = ("auto", "model", "fp8")


def kv_cache_dtype(choice: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    if choice not in KV_CACHE_CHOICES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {choice!r}")
    if choice == "fp8" or (choice == "auto" and device.type == "cuda"):
        return torch.float8_e4m3fn
    return model_dtype


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values below 2**32.

    The multipliers are below 2**31, so no product leaves int64: the same bits on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x6A09E667) & _MASK
    return x ^ (x >> 16)


def item_keys(seed: int, items: torch.Tensor) -> torch.Tensor:
    """Each item's noise key: a hash of the (up to 64-bit) seed and the item number."""
    seed_key = _mix(_mix(torch.tensor(seed & _MASK)) ^ ((seed >> 32) & _MASK))
    return _mix(seed_key ^ (items & _MASK) ^ _mix((items >> 32) & _MASK))


def counter_uniforms(keys: torch.Tensor, pos: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per (row, token): a function of the row's item key, its position
    and the token only (24 bits, exact in float32)."""
    row = _mix(keys ^ (pos & _MASK))
    x = _mix(row[:, None] ^ token_keys[None, :])  # both sides already hashed: one more round mixes them
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int = 1024  # new tokens per sample, after the prompt
    seed: int = 0
    ignore_eos: bool = False  # run every sample to max_tokens (throughput benchmarks of untrained models)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class SamplerStats:
    samples: int = 0
    generated_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def pick_tokens(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: greedy, or Gumbel-max over the temperature/top-k/top-p filtered logits.

    Gumbel-max (argmax of logits plus Gumbel noise) samples the softmax exactly and needs only
    uniform noise, which keeps the step free of host synchronisation and graph-capturable.
    """
    logits = logits.float()
    if params.temperature == 0 or noise is None:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(noise.clamp_(1e-10, 1.0 - 1e-7)))
    return (logits + gumbel).argmax(-1)


class Sampler:
    """Generates completions of many prompts with ``batch_size`` slots on one device."""

    def __init__(
        self,
        model: GPT,
        vocab: Vocabulary,
        batch_size: int = 256,
        max_len: int | None = None,
        check_every: int = 16,
        cuda_graph: bool | None = None,
        compile: bool = False,
        kv_cache: str = "auto",
    ) -> None:
        self.model = model.eval()
        self.vocab = vocab
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.B = batch_size
        self.L = min(max_len or model.cfg.block_size, model.cfg.block_size)
        self.check_every = check_every
        self.use_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        dev = self.device
        self.cache = KVCache(model.cfg, self.B, self.L, dev, kv_cache_dtype(kv_cache, dev, self.dtype))
        self.tokens = torch.zeros(self.B, self.L, dtype=torch.long, device=dev)
        self.plen = torch.ones(self.B, dtype=torch.long, device=dev)
        self.limit = torch.full((self.B,), self.L - 1, dtype=torch.long, device=dev)  # last writable position
        self.pos = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.active = torch.zeros(self.B, dtype=torch.bool, device=dev)
        self.noise = torch.empty(self.B, len(vocab), device=dev)
        self.keys = torch.zeros(self.B, dtype=torch.long, device=dev)  # each slot's item key (item_keys)
        self.token_keys = _mix(torch.arange(len(vocab), dtype=torch.long, device=dev) * 0x9E3779B1 & _MASK)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_params: SamplingParams | None = None
        # Optional: compiling fuses the small element-wise kernels of a step (the noise draw stays
        # outside, as one graph-capturable sequence of its own). Off by default: see docs/BENCHMARKS.md.
        self._advance_fn = torch.compile(self._advance, dynamic=False) if compile else self._advance

    def _step(self, params: SamplingParams) -> None:
        if params.temperature > 0:
            self.noise.copy_(counter_uniforms(self.keys, self.pos, self.token_keys))
        self._advance_fn(params)

    @torch.no_grad()
    def _advance(self, params: SamplingParams) -> None:
        rows = torch.arange(self.B, device=self.device)
        cur = self.tokens[rows, self.pos]
        logits = self.model.decode_step(cur, self.pos, self.cache)
        sampled = pick_tokens(logits, params, self.noise if params.temperature > 0 else None)
        nxt = (self.pos + 1).clamp_(max=self.L - 1)
        forced = nxt < self.plen
        new = torch.where(forced, self.tokens[rows, nxt], sampled)
        self.tokens[rows, nxt] = torch.where(self.active, new, self.tokens[rows, nxt])
        stop = nxt >= self.limit
        if not params.ignore_eos:
            stop |= new == self.vocab.eos_id
        done = self.active & ~forced & stop
        self.pos.copy_(torch.where(self.active, nxt, self.pos))
        self.active &= ~done

    def _run_steps(self, params: SamplingParams, n: int) -> None:
        if not self.use_graph:
            for _ in range(n):
                self._step(params)
            return
        # The seed only enters the item keys the graph reads: one graph serves every seed.
        key = replace(params, seed=0)
        if self._graph is None or self._graph_params != key:
            self._capture(key)
        for _ in range(n):
            self._graph.replay()

    def _capture(self, params: SamplingParams) -> None:
        # Warm up on a side stream (allocator and lazy kernels), then record one step.
        snapshot = [t.clone() for t in (self.tokens, self.pos, self.active)]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(params)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step(params)
        for t, s in zip((self.tokens, self.pos, self.active), snapshot):
            t.copy_(s)
        self._graph_params = params

    def _fill(self, slots: list[int], requests: list[tuple[int, list[int]]], params: SamplingParams) -> None:
        """Load prompts (item number, tokens) into ``slots``; their caches need no reset, attention only
        reads up to ``pos``."""
        idx = torch.tensor(slots, device=self.device)
        items = torch.tensor([item for item, _ in requests], dtype=torch.long)
        self.keys[idx] = item_keys(params.seed, items).to(self.device)
        rows = torch.zeros(len(slots), self.L, dtype=torch.long)
        lens = []
        for r, (_, prompt) in enumerate(requests):
            rows[r, : len(prompt)] = torch.tensor(prompt)
            lens.append(len(prompt))
        lens_t = torch.tensor(lens)
        self.tokens[idx] = rows.to(self.device)
        self.plen[idx] = lens_t.to(self.device)
        self.limit[idx] = (lens_t + params.max_tokens - 1).clamp(max=self.L - 1).to(self.device)
        self.pos[idx] = 0
        self.active[idx] = True

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        on_progress: Callable[[int, int], None] | None = None,
        first_item: int = 0,
    ) -> tuple[list[list[int]], SamplerStats]:
        """Complete every prompt once; returns token lists (prompt included, ``<eos>`` excluded) in input order.
        ``on_progress(finished, total)`` is called at each check of finished slots (every few steps).

        Prompt ``i`` is item ``first_item + i``: a part of a larger run passes where it starts, and its
        items come out as they would in the whole run."""
        for i, p in enumerate(prompts):
            if not 1 <= len(p) < self.L:
                raise ValueError(f"prompt {i} has {len(p)} tokens; it must be 1 to {self.L - 1}")
        if first_item < 0:
            raise ValueError(f"first_item must be >= 0, got {first_item}")
        self.active.zero_()
        pending = deque(enumerate(prompts))
        owner: list[int | None] = [None] * self.B
        results: list[list[int] | None] = [None] * len(prompts)
        stats = SamplerStats()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        free = list(range(self.B))
        done = 0
        while True:
            if free and pending:
                take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
                slots, free = free[: len(take)], free[len(take) :]
                self._fill(slots, [(first_item + i, p) for i, p in take], params)
                for s, (i, _) in zip(slots, take):
                    owner[s] = i
            if all(o is None for o in owner):
                break
            self._run_steps(params, self.check_every)
            stats.steps += self.check_every
            active = self.active.tolist()
            finished = [s for s in range(self.B) if owner[s] is not None and not active[s]]
            if finished:
                pos = self.pos[finished].tolist()
                rows = self.tokens[finished].tolist()
                for s, p, row in zip(finished, pos, rows):
                    i = owner[s]
                    last = row[p]
                    end = p if last == self.vocab.eos_id and not params.ignore_eos else p + 1
                    results[i] = row[:end]
                    stats.generated_tokens += end - len(prompts[i])
                    owner[s] = None
                free.extend(finished)
                done += len(finished)
                if on_progress is not None:
                    on_progress(done, len(prompts))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        stats.seconds = time.perf_counter() - t0
        stats.samples = len(prompts)
        return [r or [] for r in results], stats
