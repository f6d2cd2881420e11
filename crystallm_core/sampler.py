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
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from crystallm_core.model import GPT, KVCache
from crystallm_core.vocab import Vocabulary


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
        self.cache = KVCache(model.cfg, self.B, self.L, dev, self.dtype)
        self.tokens = torch.zeros(self.B, self.L, dtype=torch.long, device=dev)
        self.plen = torch.ones(self.B, dtype=torch.long, device=dev)
        self.limit = torch.full((self.B,), self.L - 1, dtype=torch.long, device=dev)  # last writable position
        self.pos = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.active = torch.zeros(self.B, dtype=torch.bool, device=dev)
        self.noise = torch.empty(self.B, len(vocab), device=dev)
        self.gen = torch.Generator(device=dev)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_params: SamplingParams | None = None
        # Optional: compiling fuses the small element-wise kernels of a step (the noise draw stays
        # outside: it uses our own seeded generator). Off by default: see docs/BENCHMARKS.md.
        self._advance_fn = torch.compile(self._advance, dynamic=False) if compile else self._advance

    def _step(self, params: SamplingParams) -> None:
        if params.temperature > 0:
            self.noise.uniform_(generator=self.gen)
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
        # The seed only reseeds the generator whose state the graph reads: one graph serves every seed.
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
        self._graph.register_generator_state(self.gen)  # replays draw fresh noise from our seeded generator
        with torch.cuda.graph(self._graph):
            self._step(params)
        for t, s in zip((self.tokens, self.pos, self.active), snapshot):
            t.copy_(s)
        self._graph_params = params

    def _fill(self, slots: list[int], requests: list[tuple[int, list[int]]], params: SamplingParams) -> None:
        """Load prompts into ``slots``; their caches need no reset, attention only reads up to ``pos``."""
        idx = torch.tensor(slots, device=self.device)
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
    ) -> tuple[list[list[int]], SamplerStats]:
        """Complete every prompt once; returns token lists (prompt included, ``<eos>`` excluded) in input order.
        ``on_progress(finished, total)`` is called at each check of finished slots (every few steps)."""
        for i, p in enumerate(prompts):
            if not 1 <= len(p) < self.L:
                raise ValueError(f"prompt {i} has {len(p)} tokens; it must be 1 to {self.L - 1}")
        self.gen.manual_seed(params.seed)
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
                self._fill(slots, take, params)
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
