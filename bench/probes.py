"""Cost of activation probes: the same training run without and with a probe on every block.

Both runs use the same config and seed. Each first takes a few untimed steps and one validation (so
compilation and lazy initialisation are paid before the clock starts), then trains ``--steps`` more
steps, validating every ``--eval-interval`` steps; the probed run also captures its probe at every
validation. Prints one JSON line: tokens/s of each run over that timed part (validation, captures,
checkpoints and end-of-run plots included), the seconds spent capturing, the size of the captures and
the relative cost of probing (1 - probed tokens/s / unprobed tokens/s).

    python bench/probes.py --data runs/perov5/data --model small               # GPU
    python bench/probes.py --data runs/demo/data --model tiny --steps 8 --batch 4 --block-size 128  # CPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from crystallm_core.events import JsonlSink
from crystallm_core.model import NAMED
from crystallm_core.train import TrainConfig, Trainer

WARMUP_STEPS = 3


def timed_run(cfg: TrainConfig) -> dict[str, Any]:
    trainer = Trainer(cfg)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    trainer.step = WARMUP_STEPS
    trainer.evaluate()
    sync()
    with JsonlSink(trainer.layout.metrics_file("train")) as sink:
        started = time.perf_counter()
        trainer.run(sink)
        sync()
        seconds = time.perf_counter() - started
    captures = list(trainer.layout.probes_dir.rglob("eval_*.pt.gz"))
    return {
        "tokens_per_s": (cfg.max_steps - WARMUP_STEPS) * trainer.tokens_per_step / seconds,
        "seconds": seconds,
        "probe_seconds": trainer.seconds["probes"],
        "captures": len(captures),
        "capture_mib": sum(p.stat().st_size for p in captures) / 2**20,
        "context": trainer.context,
        "device": torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data set with a validation split")
    ap.add_argument("--model", default="small", choices=list(NAMED))
    ap.add_argument("--batch", type=int, default=32, help="sequences per step")
    ap.add_argument("--block-size", type=int, default=None, help="context (default: the model's)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps")
    ap.add_argument("--eval-interval", type=int, default=25, help="steps between validations (and captures)")
    ap.add_argument("--subset-size", type=int, default=32, help="windows per capture")
    ap.add_argument("--positions", default=None, help="positions kept, e.g. '0:1024:4' (default: all)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    import matplotlib.figure  # noqa: F401 (imported once, outside both timed runs)

    blocks = [f"blocks.{i}" for i in range(NAMED[args.model]["n_layer"])]
    probe = {
        "name": "all_blocks",
        "source_modules": blocks,
        "target_modules": blocks,
        "subset_size": args.subset_size,
        "positions": args.positions,
        "dtype": args.dtype,
    }
    results = {}
    for label, probes in (("off", []), ("on", [probe])):
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(
                data_dir=args.data,
                out_dir=str(Path(out) / "run"),
                model=args.model,
                batch_size=args.batch,
                block_size=args.block_size,
                max_steps=WARMUP_STEPS + args.steps,
                warmup_steps=WARMUP_STEPS,
                eval_interval=args.eval_interval,
                eval_batches=4,
                log_interval=args.steps,
                compile=False if args.no_compile else None,
                probes=probes,
            )
            results[label] = timed_run(cfg)
    off, on = results["off"], results["on"]
    print(
        json.dumps(
            {
                "bench": "probes",
                "model": args.model,
                "device": off["device"],
                "context": off["context"],
                "batch_size": args.batch,
                "steps": args.steps,
                "eval_interval": args.eval_interval,
                "probed_modules": len(blocks),
                "subset_size": args.subset_size,
                "positions": args.positions or "all",
                "dtype": args.dtype,
                "tokens_per_s_off": round(off["tokens_per_s"]),
                "tokens_per_s_on": round(on["tokens_per_s"]),
                "relative_cost": round(1 - on["tokens_per_s"] / off["tokens_per_s"], 4),
                "probe_seconds": round(on["probe_seconds"], 3),
                "captures": on["captures"],
                "capture_mib": round(on["capture_mib"], 1),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
