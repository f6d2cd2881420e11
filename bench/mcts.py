"""MCTS benchmarks; each mode prints one JSON line.

``--mode speed`` runs, on one device with the same model, prompts, scorer and iteration budget,
(a) a one-rollout-at-a-time search (one rollout per step, a sampler of one slot, the scorer called
for each new valid CIF on its own, each step evaluated before the next: what a sequential search
does) and (b) the batched search (``--rollouts-per-step`` leaves per step, one sampler call and one
scorer call per step, pipelined unless ``--pipeline off``; a comma-separated list runs one batched
search per value, ``--pipeline both`` each one both ways), and reports rollouts/s and scored CIFs/s
of each, the seconds spent in each phase, and the speed-ups. The sequential search's rate is steady,
so ``--sequential-iterations`` may give it fewer rollouts than ``--iterations`` to save time.

``--mode quality`` runs, per composition, the batched search and plain sampling from the bare
prompt (same temperature and top-k) until sampling has scored as many distinct valid CIFs as the
search did, and reports the best score and the validity rate of each, and their means.

Without ``--ckpt`` the model has random weights of ``--model`` size (throughput only: its samples
are never valid; cap them with ``--max-tokens``). ``--scorer-option delay=S`` makes the ``random``
scorer take S seconds per call, like a remote predictor.

    python bench/mcts.py --ckpt SMALL.pt --scorer chgnet --prompts Ba2Ti2O6,Sr2Ti2O6 --iterations 2048 \
        --sequential-iterations 128 --rollouts-per-step 64,256,1024
    python bench/mcts.py --model tiny --max-tokens 48 --iterations 16 --rollouts-per-step 8   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from crystallm_core.mcts import Checker, MctsConfig, Search, SearchStats
from crystallm_core.model import GPT, named_config
from crystallm_core.postprocess import postprocess
from crystallm_core.prompts import make_prompt, read_prompts
from crystallm_core.sample import load_for_inference
from crystallm_core.sampler import Sampler, SamplingParams
from crystallm_core.scorers import Scorer, make_scorer, parse_options, score_checked
from crystallm_core.validity import check
from crystallm_core.vocab import Vocabulary, get_vocab


def load(args: argparse.Namespace) -> tuple[GPT, Vocabulary]:
    if args.ckpt:
        model, vocab, _ = load_for_inference(args.ckpt, args.device)
        return model, vocab
    vocab = get_vocab()
    torch.manual_seed(args.seed)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    model = GPT(named_config(args.model, len(vocab))).to(device).eval()
    return (model.to(torch.bfloat16) if device.type == "cuda" else model), vocab


PHASES = ("expand", "rollout", "check", "score", "waiting")


def totals(runs: list[SearchStats]) -> dict[str, float]:
    seconds = sum(r.seconds for r in runs)
    rollouts, scored = sum(r.rollouts for r in runs), sum(r.cifs_scored for r in runs)
    return {
        "rollouts": rollouts,
        "cifs_scored": scored,
        "scorer_calls": sum(r.scorer_calls for r in runs),
        "seconds": round(seconds, 3),
        # where the time went: model expansions, rollouts (sampling), validity checks, scorer calls, and
        # waiting for evaluations (pipelined, checks and scoring overlap the rollouts; this is what did not)
        **{f"seconds_{p}": round(sum(getattr(r, f"seconds_{p}") for r in runs), 3) for p in PHASES},
        "rollouts_per_s": rollouts / seconds if seconds else 0.0,
        "scored_per_s": scored / seconds if seconds else 0.0,
    }


@dataclass
class Setup:
    """What every search and sampling run of one benchmark shares; one validity-check pool for all."""

    model: GPT
    vocab: Vocabulary
    scorer: Scorer
    checker: Checker

    def search(self, prompt: str, cfg: MctsConfig) -> SearchStats:
        return Search(self.model, self.vocab, self.scorer, self.vocab.encode(prompt), cfg, checker=self.checker).run()


def speed(args: argparse.Namespace, setup: Setup, prompts: list[str]) -> dict:
    cfg = config(args)
    sequential = replace(
        cfg, rollouts_per_step=1, iterations=args.sequential_iterations or cfg.iterations, pipeline=False
    )
    widths = [int(w) for w in str(args.rollouts_per_step).split(",")]
    pipelines = {"on": [True], "off": [False], "both": [True, False]}[args.pipeline]
    for w in widths:  # warm-up: kernels, CUDA graphs, worker pools
        setup.search(prompts[0], replace(cfg, iterations=2 * w, rollouts_per_step=w))
    ta = totals([setup.search(p, sequential) for p in prompts])

    def ratio(x: float, y: float) -> float | None:
        return x / y if y else None

    batched = []
    for w, pipeline in [(w, on) for w in widths for on in pipelines]:
        tb = totals([setup.search(p, replace(cfg, rollouts_per_step=w, pipeline=pipeline)) for p in prompts])
        tb["rollouts_per_step"], tb["pipeline"] = w, pipeline
        tb["speedup_rollouts"] = ratio(tb["rollouts_per_s"], ta["rollouts_per_s"])
        tb["speedup_scored"] = ratio(tb["scored_per_s"], ta["scored_per_s"])
        batched.append(tb)
    return {"sequential": ta, "batched": batched}


def plain_sampling(setup: Setup, prompt: str, budget: int, cfg: MctsConfig) -> dict[str, float | int | None]:
    """Sample from the bare prompt until ``budget`` distinct valid CIFs are scored (or 8x the search's rollouts)."""
    model, vocab = setup.model, setup.vocab
    sampler = Sampler(model, vocab, batch_size=cfg.rollouts_per_step, max_len=model.cfg.block_size)
    ids = vocab.encode(prompt)
    seen: set[str] = set()
    generated = valid = scored = 0
    best: float | None = None
    batch = 0
    while scored < budget and generated < 8 * cfg.iterations:
        params = SamplingParams(
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            max_tokens=cfg.max_tokens or model.cfg.block_size,
            seed=cfg.seed * 1_000_003 + batch,
        )
        outputs, _ = sampler.generate([ids] * cfg.rollouts_per_step, params)
        batch += 1
        generated += len(outputs)
        texts = [postprocess(vocab.decode(o)) for o in outputs]
        verdicts = {t: check(t).is_valid for t in set(texts)}
        valid += sum(verdicts[t] for t in texts)
        fresh = [t for t in dict.fromkeys(texts) if t not in seen]
        seen.update(fresh)
        good = [t for t in fresh if verdicts[t]][: budget - scored]
        for r in score_checked(setup.scorer, good):
            if r.ok:
                best = r.score if best is None else min(best, r.score)
        scored += len(good)
    return {"best": best, "validity": valid / generated if generated else 0.0, "scored": scored, "sampled": generated}


def quality(args: argparse.Namespace, setup: Setup, prompts: list[str]) -> dict:
    cfg = config(args)
    rows = []
    for prompt in prompts:
        st = setup.search(prompt, cfg)
        plain = plain_sampling(setup, prompt, st.cifs_scored, cfg)
        rows.append(
            {
                "prompt": prompt.split("\n", 1)[0],
                "mcts": {
                    "best": st.best_score,
                    "validity": (st.cifs_checked - st.invalid) / st.cifs_checked if st.cifs_checked else 0.0,
                    "scored": st.cifs_scored,
                    "rollouts": st.rollouts,
                },
                "sampling": plain,
            }
        )

    def mean(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return sum(kept) / len(kept) if kept else None

    return {
        "per_prompt": rows,
        "mean_best_mcts": mean([r["mcts"]["best"] for r in rows]),
        "mean_best_sampling": mean([r["sampling"]["best"] for r in rows]),
        "validity_mcts": mean([r["mcts"]["validity"] for r in rows]),
        "validity_sampling": mean([r["sampling"]["validity"] for r in rows]),
    }


def config(args: argparse.Namespace) -> MctsConfig:
    return MctsConfig(
        iterations=args.iterations,
        rollouts_per_step=int(str(args.rollouts_per_step).split(",")[0]),
        selector=args.selector,
        c=args.c,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        check_workers=args.check_workers,
        pipeline=args.pipeline != "off",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["speed", "quality"], default="speed")
    ap.add_argument("--ckpt", default=None, help="trained checkpoint (default: random weights of --model)")
    ap.add_argument("--model", default="tiny", help="named size for random weights")
    ap.add_argument("--prompts", default="Ba2Ti2O6", help="comma-separated compositions, or a prompts file")
    ap.add_argument("--scorer", default="random")
    ap.add_argument("--scorer-option", action="append", default=[], metavar="K=V")
    ap.add_argument("--iterations", type=int, default=64, help="rollouts per search")
    ap.add_argument("--rollouts-per-step", default="32", help="leaves per step; speed mode: a comma-separated list")
    ap.add_argument("--pipeline", choices=["on", "off", "both"], default="on", help="batched searches pipelined?")
    ap.add_argument("--sequential-iterations", type=int, default=None, help="rollouts of the sequential search")
    ap.add_argument("--selector", default="puct")
    ap.add_argument("--c", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--check-workers", type=int, default=min(8, os.cpu_count() or 1), help="validity-check processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    spec = Path(args.prompts)
    pairs = read_prompts(spec) if spec.is_file() else [(c.strip(), None) for c in args.prompts.split(",") if c.strip()]
    prompts = [make_prompt(c, sg) for c, sg in pairs]
    model, vocab = load(args)
    device = next(model.parameters()).device
    scorer = make_scorer(args.scorer, parse_options(args.scorer_option, "--scorer-option"), device=str(device))
    setup = Setup(model, vocab, scorer, Checker(args.check_workers))
    t0 = time.perf_counter()
    try:
        result = (speed if args.mode == "speed" else quality)(args, setup, prompts)
    finally:
        scorer.close()
        setup.checker.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        json.dumps(
            {
                "mode": args.mode,
                "device": name,
                "model": args.ckpt or f"{args.model} (random weights)",
                "scorer": args.scorer,
                "prompts": [c for c, _ in pairs],
                "iterations": args.iterations,
                "wall_s": round(time.perf_counter() - t0, 3),
                **result,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
