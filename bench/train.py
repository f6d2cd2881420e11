"""Training throughput and MFU of the real training step (data windows, autocast, compile, AdamW).

MFU is measured against the bf16 matmul peak of the same device, measured in the same run
(an 8192^3 product), not a datasheet figure. FLOPs per token count 6 per weight plus the
attention scores and values at the full context. Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from crystallm_core.train import TrainConfig, Trainer


def bench(model: str, data: str, batch: int, steps: int, warmup: int, compile_: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data_dir=data, out_dir=out, model=model, batch_size=batch, max_steps=10**6,
                          warmup_steps=10, compile=compile_)  # fmt: skip
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
            "tokens_per_s": round(tps),
            "mfu": round(tps * flops / trainer.peak, 4) if trainer.peak else None,
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
    ap.add_argument("--batch", default="small=64,large=16", help="micro-batch sequences per model")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    batches = dict(kv.split("=") for kv in args.batch.split(","))
    for m in args.models.split(","):
        print(json.dumps(bench(m, args.data, int(batches.get(m, 8)), args.steps, args.warmup, not args.no_compile)))


if __name__ == "__main__":
    main()
