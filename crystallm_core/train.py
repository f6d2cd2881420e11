"""Training: ``crystallm train CONFIG [key=value ...] [--resume] [--smoke]``.

Batches are windows of ``block_size + 1`` tokens that start at the first token of a CIF
(the model always sees a CIF from its ``data_`` line, as it will when sampling). The
optimizer is AdamW with decoupled weight decay on matrices only; the learning rate
warms up linearly, then follows a cosine down to ``min_lr``. Checkpoints hold
everything needed to continue bit for bit: model, optimizer, scheduler, step, every
RNG state (including the batch sampler's), config and vocabulary id.

``out_dir`` is an experiment root (crystallm_core/layout.py): checkpoints go to ``ckpts/``,
activation probes (crystallm_core/probes.py) to ``probes/``, curves to ``plots/`` at the end of
every run, and events to ``$CRYSTALLM_EVENTS``, else ``metrics/train.jsonl``.

Data parallelism (docs/DISTRIBUTED.md): launched by ``python -m torch.distributed.run``, every rank runs
this same code; crystallm_core/distributed.py reads the torchrun environment, starts the process group and
wraps the model (``parallel``: ``ddp`` or ``fsdp``). The global batch is ``batch_size * grad_accum``
sequences whatever the world size: ``grad_accum`` counts micro-batches over all ranks, and each rank runs
``grad_accum / world`` of them. Every rank draws the whole step's windows from the same seeded sampler and
keeps its own slice, so the sampler state is the same on every rank and a run continues identically at
another world size. Rank 0 alone writes checkpoints, events, plots and probe captures.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crystallm_core import checkpoint, distributed
from crystallm_core.config import ConfigError, apply_overrides, build, load_file
from crystallm_core.events import ENV_VAR, JsonlSink
from crystallm_core.layout import ExperimentLayout
from crystallm_core.model import GPT, named_config
from crystallm_core.probes import SMOKE_SUBSET, CaptureWriteError, Prober, parse_probes
from crystallm_core.tokens import TokenData, read_meta
from crystallm_core.vocab import vocab_for_id


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    out_dir: str
    model: str = "small"
    dropout: float = 0.0
    block_size: int | None = None  # default: the model's context
    batch_size: int = 32  # sequences per micro-batch on one rank
    grad_accum: int = 1  # micro-batches per step over all ranks: a multiple of the world size
    max_steps: int = 5000
    warmup_steps: int = 100
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool | None = None  # default: on for CUDA
    smoke: bool = False
    smoke_cifs: int = 64  # data subset in smoke mode
    probes: list[dict] = field(default_factory=list)  # activation probes (crystallm_core/probes.py)
    parallel: str = "ddp"  # ddp | fsdp: how the model is wrapped under torchrun (ignored in one process)

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError("need warmup_steps >= 0 and 0 <= min_lr <= lr > 0")
        if self.parallel not in distributed.PARALLEL:
            raise ValueError(f"parallel must be one of {', '.join(distributed.PARALLEL)}, got {self.parallel!r}")
        # Checked key by key now; stored with their defaults filled in, so checkpoints record what ran.
        object.__setattr__(self, "probes", [spec.to_dict() for spec in parse_probes(self.probes)])

    def smoked(self) -> TrainConfig:
        """The same run in miniature: few steps, small batches, a data subset, no compile."""
        return replace(
            self,
            smoke=True,
            max_steps=min(self.max_steps, 4),
            warmup_steps=min(self.warmup_steps, 1),
            eval_interval=2,  # two validations and checkpoint rounds, as in a real run
            eval_batches=1,
            log_interval=1,
            batch_size=min(self.batch_size, 2),
            grad_accum=distributed.from_env().world,  # one micro-batch per rank
            block_size=min(self.block_size or 256, 256),
            compile=False,
            probes=[{**p, "subset_size": min(p["subset_size"], SMOKE_SUBSET)} for p in self.probes],
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Windows:
    """CIF-aligned training windows drawn by a seeded generator whose state is checkpointed.

    :meth:`pick` draws the CIFs of a batch (advancing the generator), :meth:`load` reads their tokens:
    every rank picks every micro-batch of a step, in the same order, and loads only its own."""

    def __init__(self, data: TokenData, length: int, seed: int, limit: int | None = None) -> None:
        self.tokens = data.tokens
        self.starts = np.asarray(data.starts[: limit or len(data.starts)], dtype=np.int64)
        self.length = length
        self.offsets = np.arange(length, dtype=np.int64)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(self.pick(size), device)

    def pick(self, size: int) -> np.ndarray:
        return torch.randint(len(self.starts), (size,), generator=self.gen).numpy()

    def load(self, pick: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Windows running past the end of the stream wrap to its beginning (another CIF start).
        idx = (self.starts[pick][:, None] + self.offsets[None, :]) % len(self.tokens)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        chunk = chunk.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else chunk.to(device)
        return chunk[:, :-1], chunk[:, 1:]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def cuda_rng_state(device: torch.device | None = None) -> list[torch.Tensor]:
    """Every GPU's generator state in one process; only ``device``'s under torchrun (one GPU per rank:
    asking for the others would open a context on each)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_rng_state(device)] if device is not None else torch.cuda.get_rng_state_all()


def rng_state(windows: Windows, device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG state, as tensors and plain values only (checkpoints are loaded with ``weights_only``)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": cuda_rng_state(device),
        "windows": windows.gen.get_state(),
    }


def set_rng_state(state: dict[str, Any], windows: Windows, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]  # key: a tensor, or a numpy array in checkpoints written before
    key = key.numpy() if isinstance(key, torch.Tensor) else key
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if device is not None:
            torch.cuda.set_rng_state(state["cuda"][0], device)
        else:
            torch.cuda.set_rng_state_all(state["cuda"])
    windows.gen.set_state(state["windows"])


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Dropout seed of a rank other than 0 (rank 0 keeps the single-process stream)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


class _NullSink:
    """What ranks other than 0 report to: nothing."""

    path = None

    def metric(self, step: int, **values: float) -> None:
        pass

    def artifact(self, path: str | Path, kind: str) -> None:
        pass

    def progress(self, what: str, done: int, total: int | None) -> None:
        pass


def measure_matmul_peak(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """bf16 matmul FLOP/s actually reached on this device: the yardstick for MFU. None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        # Absolute, so that artifact events name the same files from any events file.
        self.layout = ExperimentLayout(Path(cfg.out_dir).absolute())
        self.ckpt_dir = self.layout.ckpts_dir
        self.dist, self.device = distributed.setup(cfg.device)
        d = self.dist
        if cfg.grad_accum % d.world:
            raise ConfigError(
                f"grad_accum ({cfg.grad_accum}) counts micro-batches per step over all ranks and must be "
                f"a multiple of the world size ({d.world})"
            )
        self.local_accum = cfg.grad_accum // d.world  # micro-batches per step on this rank
        self.parallel = cfg.parallel if d.active else None
        if self.parallel == "fsdp" and cfg.probes:
            raise ConfigError("probes need the whole model on rank 0: use parallel ddp (or one process)")
        torch.set_float32_matmul_precision("high")  # TF32 for any float32 matmul left outside autocast
        meta = read_meta(cfg.data_dir)
        self.vocab = vocab_for_id(meta.get("vocab_id", "<none>"))
        self.model_cfg = named_config(cfg.model, len(self.vocab), cfg.dropout, cfg.block_size)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_cfg)  # built on the CPU: the same initial weights on every rank
        use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        if self.parallel == "fsdp":  # moved to the device one sharded unit at a time
            distributed.shard(self.model, self.device, self.dist, compile_blocks=use_compile)
        else:
            self.model.to(self.device)
        limit = cfg.smoke_cifs if cfg.smoke else None
        train_data = TokenData(cfg.data_dir, "train", self.vocab)
        self.train_windows = Windows(train_data, self.context + 1, cfg.seed, limit)
        # Tokens of the CIFs training draws from: one epoch (for the probes' metadata).
        self.train_tokens = (
            int(train_data.starts[limit]) if limit and limit < len(train_data) else len(train_data.tokens)
        )
        has_val = meta.get("splits", {}).get("val", {}).get("cifs", 0) > 0
        self.val_data = TokenData(cfg.data_dir, "val", self.vocab) if has_val else None
        self.opt = make_optimizer(self.model, cfg, self.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.best_val = math.inf
        self.resumed_step: int | None = None  # the checkpoint's step, when resumed
        own_rng = False
        if resume:
            own_rng = self._resume()
        if d.rank > 0 and not own_rng:  # dropout masks of their own, not rank 0's
            torch.manual_seed(rank_seed(cfg.seed, d.rank, self.step))
        # ``model`` stays the plain GPT (state dicts, probes); ``wrapped`` is what training calls.
        self.wrapped: torch.nn.Module = (
            distributed.wrap_ddp(self.model, self.device) if self.parallel == "ddp" else self.model
        )
        # FSDP blocks are compiled in place by shard(); the hooks between them stay eager.
        self.forward = torch.compile(self.wrapped) if use_compile and self.parallel != "fsdp" else self.wrapped
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        # Rank 0 alone captures probes, on the plain model; unknown modules fail here, before any step.
        self.prober = self._prober() if cfg.probes and d.is_main else None
        self.peak = measure_matmul_peak(self.device)
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * self.context
        self.seconds = {"validation": 0.0, "probes": 0.0, "checkpoints": 0.0}  # time training waited for each
        self.probe_write_seconds = 0.0  # writing captures in the background, alongside training
        self.say = print if d.is_main else (lambda *args, **kw: None)  # rank 0 alone logs

    def _prober(self) -> Prober:
        cfg = self.cfg
        data = Path(cfg.data_dir).resolve()
        info = {
            "data_set": f"{data.parent.name}/{data.name}",  # e.g. perov5/data: the folder alone is often "data"
            "data_dir": str(data),
            "split": "val",
            "vocab_id": self.vocab.id,
            "model": cfg.model,
            "context": self.context,
        }
        return Prober(
            parse_probes(cfg.probes),
            self.model,
            self.context,
            self.val_data,
            self.device,
            cfg.batch_size,
            cfg.seed + 2,  # validation loss uses seed + 1
            info,
            self.autocast,
            cfg.smoke,
        )

    def _ranks(self) -> str:
        d = self.dist
        if not d.active:
            return ""
        return f" ({self.parallel}, rank {d.rank} of {d.world}; {self.local_accum} micro-batches per rank and step)"

    @property
    def context(self) -> int:
        return self.model_cfg.block_size

    def _resume(self) -> bool:
        """Load ``last.pt`` (every rank reads the same file, written at any world size). Returns whether
        this rank got back its own dropout generator (same world size as when it was written)."""
        path = self.ckpt_dir / "last.pt"
        fsdp = self.parallel == "fsdp"
        ckpt = checkpoint.read(path, map_location="cpu" if fsdp else self.device)
        if ckpt["vocab_id"] != self.vocab.id:
            raise ConfigError(f"{path} was trained with vocabulary {ckpt['vocab_id']}, data set uses {self.vocab.id}")
        if ckpt["model_config"] != self.model_cfg.to_dict():
            raise ConfigError(f"{path} holds a model {ckpt['model_config']}, config asks for {self.model_cfg}")
        if fsdp:
            distributed.load_model_state(self.model, ckpt["model"])
            distributed.load_optimizer_state(self.model, self.opt, ckpt["optimizer"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.step = self.resumed_step = ckpt["step"]
        self.best_val = ckpt["best_val_loss"]
        # The windows' generator is the same on every rank; python/numpy/torch are rank 0's.
        set_rng_state(ckpt["rng"], self.train_windows, self.device if self.dist.active else None)
        ranks = ckpt["rng"].get("ranks")
        if self.dist.rank > 0 and ranks is not None and len(ranks) == self.dist.world:
            own = ranks[self.dist.rank]
            torch.set_rng_state(own["torch"])
            if own["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.device)
            return True
        return False

    def save(self, name: str, sink: JsonlSink) -> None:
        """Called on every rank (FSDP gathers the full state to rank 0); rank 0 alone writes, in the
        single-process format."""
        d = self.dist
        rng = rng_state(self.train_windows, self.device if d.active else None)
        if d.world > 1:  # each rank's dropout generator, restored when resumed at the same world size
            own = {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            }
            rng["ranks"] = distributed.all_gather_objects(own, d)
        if self.parallel == "fsdp":
            model_state = distributed.model_state(self.model)
            opt_state = distributed.optimizer_state(self.model, self.opt)
        elif d.is_main:
            model_state, opt_state = self.model.state_dict(), self.opt.state_dict()
        if not d.is_main:
            return
        path = checkpoint.save(
            self.ckpt_dir / f"{name}.pt",
            {
                "model": model_state,
                "optimizer": opt_state,
                "scheduler": self.sched.state_dict(),
                "step": self.step,
                "rng": rng,
                "config": asdict(self.cfg),
                "model_config": self.model_cfg.to_dict(),
                "vocab_id": self.vocab.id,
                "n_params": self.model.num_params(),
                "best_val_loss": self.best_val,
                "world_size": d.world,
            },
        )
        sink.artifact(path, "checkpoint")

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the same validation windows every time (their own fixed-seed generator).

        Under torchrun, batch ``i`` is computed by rank ``i % world``; the per-batch losses are summed
        into one vector (each slot from one rank, the others adding 0) and added up in order, as one
        process does: the value is the single-process one."""
        if self.val_data is None:
            return None
        d, n = self.dist, self.cfg.eval_batches
        self.model.eval()
        windows = Windows(self.val_data, self.context + 1, seed=self.cfg.seed + 1)
        picks = [windows.pick(self.cfg.batch_size) for _ in range(n)]  # every rank draws them all
        mine: list[int | None] = list(range(d.rank, n, d.world))
        if self.parallel == "fsdp":  # every rank must run as many forwards (their all-gathers pair up)
            mine += [None] * (-(-n // d.world) - len(mine))
        losses = torch.zeros(n, dtype=torch.float64)
        for i in mine:
            x, y = windows.load(picks[0 if i is None else i], self.device)
            with self.autocast:
                loss = float(self.forward(x, y)[1])
            if i is not None:
                losses[i] = loss
        self.model.train()
        if d.world > 1:
            losses = distributed.all_sum_(losses.to(self.device), d).cpu()
        total = 0.0
        for v in losses.tolist():
            total += v
        return total / n

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns their mean loss (over all ranks).

        Every rank draws the step's ``grad_accum`` micro-batches from the one sampler, in order, and runs
        its own contiguous slice of ``grad_accum / world``. Gradients are averaged over the ranks (DDP's
        all-reduce, FSDP's reduce-scatter), so each rank scales its losses by its own count: the step's
        gradient is the mean over all micro-batches, as in one process. DDP all-reduces only after the
        last micro-batch (``no_sync`` before); FSDP reduce-scatters each one, keeping gradients sharded."""
        cfg, d, k = self.cfg, self.dist, self.local_accum
        picks = [self.train_windows.pick(cfg.batch_size) for _ in range(cfg.grad_accum)]
        total = 0.0
        for j, pick in enumerate(picks[d.rank * k : (d.rank + 1) * k]):
            x, y = self.train_windows.load(pick, self.device)
            skip_sync = self.parallel == "ddp" and j < k - 1
            with self.wrapped.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
                with self.autocast:
                    _, loss = self.forward(x, y)
                (loss / k).backward()
            total += float(loss.detach()) / k
        total = distributed.all_mean(total, d, self.device)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def run(self, sink: JsonlSink, progress: Any | None = None, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``max_steps``, or pause after ``stop_at`` steps (the schedule still spans ``max_steps``)."""
        cfg = self.cfg
        last = min(cfg.max_steps, stop_at or cfg.max_steps)
        self.model.train()
        self.say(
            f"training {cfg.model} ({self.model.num_params() / 1e6:.2f} M parameters, context {self.context}) "
            f"on {self.device}{self._ranks()} from step {self.step} to {cfg.max_steps}",
            flush=True,
        )
        losses: list[float] = []
        started = time.perf_counter()
        if self.prober is not None and self.step == self.resumed_step:
            self._retake_captures(sink)
        t_last, steps_since = started, 0
        while self.step < last:
            lr = self.sched.get_last_lr()[0]
            loss = self.train_step()
            self.step += 1
            steps_since += 1
            losses.append(loss)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t_last
                tps = steps_since * self.tokens_per_step / dt
                values = {"loss": loss, "lr": lr, "tokens_per_s": tps}
                if self.peak:
                    # tokens/s are the whole world's, the peak is one device's
                    values["mfu"] = tps * self.model.flops_per_token(self.context) / (self.peak * self.dist.world)
                    values["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                sink.metric(self.step, **values)
                sink.progress("train", self.step, cfg.max_steps)
                self.say(f"step {self.step}: loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s", flush=True)
                t_last, steps_since = time.perf_counter(), 0
            if self.prober is not None:
                self._report_captures(sink)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                self._checkpoint(sink, ending=self.step == last)
                t_last, steps_since = time.perf_counter(), 0
            if progress is not None:
                progress(self.step)
        if self.prober is not None and self.prober.writing:  # paused between validations
            self._charge_probes(sink, self._wait_for_captures(sink))
        self._report_time(time.perf_counter() - started, sink)
        self._plot(sink)
        best = self.best_val if math.isfinite(self.best_val) else None
        return {"steps": self.step, "final_loss": losses[-1] if losses else None, "best_val_loss": best}

    def _checkpoint(self, sink: JsonlSink, ending: bool) -> None:
        """Validate, capture the probes that are due, then write ``last`` and, when validation improved
        (or there is none), ``best``. Captures are written in the background while training goes on;
        the run's last validation (``ending``) waits for them, so the run returns with all on disk."""
        t0 = time.perf_counter()
        val = self.evaluate()
        if val is not None:
            sink.metric(self.step, val_loss=val)
            self.say(f"step {self.step}: val loss {val:.4f}", flush=True)
        self.seconds["validation"] += time.perf_counter() - t0
        probing = self._capture(sink) if self.prober is not None else None
        t0 = time.perf_counter()
        if val is None or val < self.best_val:
            self.best_val = val if val is not None else self.best_val
            self.save("best", sink)
        self.save("last", sink)
        self.seconds["checkpoints"] += time.perf_counter() - t0
        if self.prober is not None and ending and self.prober.writing:
            probing = (probing or 0.0) + self._wait_for_captures(sink)
        if probing is not None:
            self._charge_probes(sink, probing)

    def _capture(self, sink: JsonlSink, missing: bool = False) -> float | None:
        """Capture the probes due at this step's validation (``missing``: only those without a file);
        returns the seconds training waited for them, None when none was due."""
        assert self.prober is not None
        # Validations run at multiples of eval_interval and at the last step; this is validation number n.
        n = -(-self.step // self.cfg.eval_interval)
        due = [
            (probe, self.layout.probe_capture(probe.spec.name, self.step))
            for probe in self.prober.due(n, final=self.step == self.cfg.max_steps)
        ]
        due = [(probe, path) for probe, path in due if not (missing and path.exists())]
        if not due:
            return None
        tokens_seen = self.step * self.tokens_per_step
        spent = 0.0
        for probe, path in due:
            spent += self.prober.capture(probe, path, self.step, tokens_seen, tokens_seen / self.train_tokens).seconds
            self._report_captures(sink)
        return spent

    def _retake_captures(self, sink: JsonlSink) -> None:
        """``last`` is written while its step's captures may still be in flight: a run that stopped before
        they landed is resumed with them missing. Take them again from the restored model (the same
        weights and windows), and wait for them, before training goes on."""
        spent = self._capture(sink, missing=True)
        if spent is not None:
            self.say(f"step {self.step}: probe captures of the checkpoint were missing; taken again", flush=True)
            self._charge_probes(sink, spent + self._wait_for_captures(sink))

    def _wait_for_captures(self, sink: JsonlSink) -> float:
        """Wait for the capture being written, report it, and return the seconds waited."""
        assert self.prober is not None
        t0 = time.perf_counter()
        self.prober.wait()
        waited = time.perf_counter() - t0
        self._report_captures(sink)
        return waited

    def _report_captures(self, sink: JsonlSink) -> None:
        """An artifact event and a log line for each capture renamed into place since the last report."""
        assert self.prober is not None
        for cap in self.prober.written():
            sink.artifact(cap.path, "probe")
            self.probe_write_seconds += cap.write_seconds
            self.say(
                f"step {cap.step}: probe {cap.probe.spec.name}: {cap.shape[0]} windows x {cap.shape[1]} positions x "
                f"{len(cap.probe.spec.modules)} modules -> {self.layout.relative(cap.path)} "
                f"({cap.bytes / 2**20:.1f} MiB, {cap.seconds:.2f} s; written in {cap.write_seconds:.2f} s "
                "in the background)",
                flush=True,
            )

    def _charge_probes(self, sink: JsonlSink, seconds: float) -> None:
        """Record what probing made training wait at this step."""
        sink.metric(self.step, probe_seconds=seconds)
        self.seconds["probes"] += seconds

    def _report_time(self, total: float, sink: JsonlSink) -> None:
        """Where this run's time went; with probes, what capturing cost against training."""
        training = total - sum(self.seconds.values())
        parts = ", ".join(f"{v:.1f} s {k}" for k, v in self.seconds.items() if k != "probes" or self.prober)
        self.say(f"time: {training:.1f} s training, {parts}", flush=True)
        if self.prober is not None:
            spent = self.seconds["probes"]
            share = spent / training if training > 0 else math.inf
            self.say(
                f"probes: {spent:.1f} s capturing vs {training:.1f} s training ({share:.1%}); "
                f"{self.probe_write_seconds:.1f} s writing in the background",
                flush=True,
            )
            sink.metric(
                self.step,
                probe_seconds_total=spent,
                probe_write_seconds_total=self.probe_write_seconds,
                train_seconds=training,
            )

    def _plot(self, sink: JsonlSink) -> None:
        """Training curves into plots/. They are derived from the events file and can be redrawn with
        ``crystallm plot``, so a failure here is reported and does not fail the run. Rank 0 alone."""
        if not self.dist.is_main:
            return
        from crystallm_core.plots import plot_training

        try:
            paths = plot_training([sink.path], self.layout.plots_dir)
        except Exception as e:  # matplotlib and the file system raise many kinds
            print(f"plots: not drawn: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return
        for p in paths:
            sink.artifact(p, "plot")


def load_config(path: str, overrides: list[str], smoke: bool) -> TrainConfig:
    cfg = build(TrainConfig, apply_overrides(load_file(path), overrides), where=f"train config {path}")
    return cfg.smoked() if smoke or cfg.smoke else cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML or JSON training config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/ckpts/last.pt")
    p.add_argument("--smoke", action="store_true", help="a few steps on a data subset, no compile")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    finally:
        distributed.shutdown()


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides, args.smoke)
        trainer = Trainer(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"crystallm train: {e}", file=sys.stderr)
        return 2
    main = trainer.dist.is_main
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    try:
        if not main:  # rank 0 alone writes events
            trainer.run(_NullSink())  # type: ignore[arg-type]
            distributed.barrier(trainer.dist)  # leave together: rank 0 may still be writing
            return 0
        with JsonlSink(os.environ.get(ENV_VAR) or trainer.layout.metrics_file("train")) as sink:
            if sys.stderr.isatty():
                from rich.progress import Progress

                with Progress(transient=True) as bar:
                    task = bar.add_task("train", total=cfg.max_steps, completed=trainer.step)
                    result = trainer.run(sink, progress=lambda s: bar.update(task, completed=s))
            else:
                result = trainer.run(sink)
    except CaptureWriteError as e:
        print(f"crystallm train: {e}", file=sys.stderr)
        return 1  # torchrun stops the other ranks when one fails
    distributed.barrier(trainer.dist)
    print(f"done: {result}", flush=True)
    return 0
