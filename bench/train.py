"""Training throughput and MFU of the real training step (data windows, autocast, compile, AdamW).

MFU is measured against the bf16 matmul peak of the same device, measured in the same run
(an 8192^3 product), not a datasheet figure. FLOPs per token count 6 per weight plus the
attention scores and values at the full context. Prints one JSON line per model and world size.

``--nproc 1,2,4`` measures each world size: 1 runs in this process as plain single-process training
(``--torchrun`` launches it under torchrun too, i.e. DDP at world size 1, the wrapper's own cost); larger
ones launch ``python -m torch.distributed.run --standalone --nproc-per-node N`` on this script, whose rank 0
prints the line. Every rank runs ``--accum`` micro-batches of ``--batch`` windows per step (weak
scaling: the global batch grows with the world); tokens/s count the whole world's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from crystallm_core import distributed
from crystallm_core.train import TrainConfig, Trainer


def bench(
    model: str, data: str, batch: int, steps: int, warmup: int, compile_: bool, accum: int = 1, parallel: str = "ddp"
) -> dict:
    world = distributed.from_env().world
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data_dir=data, out_dir=out, model=model, batch_size=batch, max_steps=10**6,
                          warmup_steps=10, compile=compile_, grad_accum=accum * world,
                          parallel=parallel)  # fmt: skip
        trainer = Trainer(cfg)
        for _ in range(warmup):
            trainer.train_step()
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        dt = time.perf_counter() - t0
        tps = steps * trainer.tokens_per_step / dt
        flops = trainer.model.flops_per_token(trainer.context)
        return {
            "bench": "train",
            "model": model,
            "params_m": round(trainer.model.num_params() / 1e6, 2),
            "context": trainer.context,
            "batch_size": batch,
            "world_size": world,
            "parallel": trainer.parallel,  # None: plain single-process training
            "global_batch": batch * cfg.grad_accum,
            "tokens_per_s": round(tps),
            "tokens_per_s_per_rank": round(tps / world),
            "mfu": round(tps * flops / (trainer.peak * world), 4) if trainer.peak else None,
            "matmul_peak_tflops": round(trainer.peak / 1e12, 1) if trainer.peak else None,
            "model_tflops": round(tps * flops / 1e12, 1),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if trainer.peak else None,
            "compile": compile_,
            "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="prepared data set (token files)")
    ap.add_argument("--models", default="small,large")
    ap.add_argument("--batch", default="small=64,large=16", help="micro-batch sequences per model (per rank)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per rank and step")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--nproc", default="1", help="world sizes to measure, e.g. 1,2,4")
    ap.add_argument("--torchrun", action="store_true", help="world size 1 under torchrun too (DDP), not plain")
    ap.add_argument("--parallel", default="ddp", choices=distributed.PARALLEL)
    args = ap.parse_args()
    batches = dict(kv.split("=") for kv in args.batch.split(","))

    def measure() -> None:
        for m in args.models.split(","):
            result = bench(m, args.data, int(batches.get(m, 8)), args.steps, args.warmup, not args.no_compile,
                           args.accum, args.parallel)  # fmt: skip
            if distributed.from_env().is_main:
                print(json.dumps(result), flush=True)

    if "RANK" in os.environ:  # a rank launched by torchrun (below)
        try:
            measure()
        finally:
            distributed.shutdown()
        return
    for n in (int(x) for x in args.nproc.split(",")):
        if n == 1 and not args.torchrun:
            measure()
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__]
        cmd += ["--data", args.data, "--models", args.models, "--batch", args.batch, "--accum", str(args.accum)]
        cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--parallel", args.parallel]
        subprocess.run(cmd + (["--no-compile"] if args.no_compile else []), check=True)


if __name__ == "__main__":
    main()
