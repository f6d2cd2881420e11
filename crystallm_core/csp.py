"""``crystallm benchmark csp``: crystal-structure prediction from composition alone.

For every test structure the model gets its composition (the cell formula of the
canonical conventional cell, no space group) and makes ``n`` attempts. An attempt
matches when pymatgen's StructureMatcher (stol=0.5, angle_tol=10, ltol=0.3, the
settings of the CDVAE/DiffCSP/CrystaLLM papers) finds it equivalent to the true
structure. Only attempts that pass the validity checks are matched (as in CDVAE's
evaluation, where an invalid structure never counts as a match); besides being the
fair rule, it keeps StructureMatcher away from degenerate cells, on which it can spend
minutes. Reported, for the first attempt and for all ``n``: the match rate (share of
test structures with a match) and the RMSE (mean over matched structures of the
smallest normalised RMS displacement among their matching attempts), plus the
validity of all generated CIFs.

Each figure is reported twice: under this project's validity rule (``crystallm_core.validity.check``:
formula, multiplicities, bonds and space group must agree) and, prefixed ``published_``, under the rule of
the CDVAE and DiffCSP papers (``check_published``: cell volume >= 0.1 Å³, no two atoms closer than 0.5 Å,
a SMACT-valid composition), so that a figure can be set beside the papers' tables. The matcher is the
same; only which attempts may match differs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crystallm_core.events import JsonlSink, ProgressReporter, open_sink
from crystallm_core.shards import CSP_REPORT, CSP_RESULTS, CSP_SAMPLES, Shard, add_shard_argument, write_csp_results

MATCHER = dict(stol=0.5, angle_tol=10, ltol=0.3)
# StructureMatcher can spend minutes on one degenerate cell (the published rule lets far odder cells through
# than ours): an attempt still unmatched after this long counts as no match, and the count is reported.
MATCH_TIMEOUT_S = 20.0
SMOKE_TOKENS = 64  # --smoke: generated tokens per attempt, as `crystallm sample --smoke`


@dataclass(frozen=True)
class CspResult:
    structures: int
    attempts: int
    match_rate_1: float
    rmse_1: float | None
    match_rate_n: float
    rmse_n: float | None
    validity: float
    samples_per_s: float
    published_match_rate_1: float
    published_rmse_1: float | None
    published_match_rate_n: float
    published_rmse_n: float | None
    published_validity: float
    match_timeouts: int


class _MatchTimeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _MatchTimeout


@functools.lru_cache(maxsize=64)
def _truth(text: str) -> Any:
    """A truth parsed once per worker: its attempts arrive as separate tasks, mostly one after another."""
    from pymatgen.core import Structure

    return Structure.from_str(text, fmt="cif")


@functools.lru_cache(maxsize=1)
def _matcher() -> Any:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(**MATCHER)


def _match_pair(task: tuple[str, str]) -> tuple[float | None, bool]:
    """RMS distance of one attempt to its truth (None where it does not match), and whether it ran out of
    :data:`MATCH_TIMEOUT_S` (counted as no match)."""
    import signal

    from crystallm_core.cif import parse_structure

    truth_text, text = task
    timed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _alarm) if timed else None
    try:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, MATCH_TIMEOUT_S)
        rms = _matcher().get_rms_dist(_truth(truth_text).copy(), parse_structure(text))
    except _MatchTimeout:
        return None, True
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return (None if rms is None else float(rms[0])), False


def match_all(
    jobs: list[tuple[str, list[str | None]]], workers: int, on_progress: Callable[[int], None] | None = None
) -> tuple[list[list[float | None]], list[int]]:
    """Every job's RMS distances, in order, and how many of its attempts ran out of :data:`MATCH_TIMEOUT_S`;
    ``on_progress(jobs done)`` as they finish.

    Each attempt is a task of its own (None, an attempt no rule let through, is not sent): the attempts a
    model writes for one composition tend to fail alike, and as one task they would run one after another,
    up to n times the time limit on one worker while the others idle."""
    tasks = [(truth, text) for truth, attempts in jobs for text in attempts if text is not None]
    rms: list[list[float | None]] = [[None] * len(attempts) for _, attempts in jobs]
    timeouts = [0] * len(jobs)
    where = [(j, i) for j, (_, attempts) in enumerate(jobs) for i, text in enumerate(attempts) if text is not None]
    last = {j: k for k, (j, _) in enumerate(where)}  # a job is done when its last task's result arrives (in order)
    done = len(jobs) - len(last)  # jobs with nothing to match
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            results: Iterable[tuple[float | None, bool]] = map(_match_pair, tasks)
        else:
            pool = stack.enter_context(mp.get_context("forkserver").Pool(workers))
            results = pool.imap(_match_pair, tasks, chunksize=max(1, len(tasks) // (32 * workers)))
        if on_progress is not None and done:
            on_progress(done)
        for k, (value, timed_out) in enumerate(results):
            j, i = where[k]
            rms[j][i] = value
            timeouts[j] += timed_out
            if last[j] == k:
                done += 1
                if on_progress is not None:
                    on_progress(done)
    return rms, timeouts


def check_published_texts(texts: list[str | None], workers: int) -> list[bool]:
    """The published rule's verdict on each text, in order, on ``workers`` processes."""
    from crystallm_core.validity import check_published

    if workers <= 1 or len(texts) < 2:
        return [check_published(t or "").is_valid for t in texts]
    with mp.get_context("forkserver").Pool(min(workers, len(texts))) as pool:
        chunk = max(1, len(texts) // (8 * workers))
        return [v.is_valid for v in pool.imap(check_published, [t or "" for t in texts], chunksize=chunk)]


def keep(rms: list[list[float | None]], allowed: list[list[bool]]) -> list[list[float | None]]:
    """``rms`` with the distance of every attempt that ``allowed`` (per structure, per attempt) rules out dropped."""
    return [[r if ok else None for r, ok in zip(row, oks, strict=True)] for row, oks in zip(rms, allowed, strict=True)]


def figures(results: list[dict[str, Any]], samples_per_s: float) -> CspResult:
    """The benchmark's figures from its per-structure results (``results.jsonl``): one computation for a whole
    run and for the merge of its parts. A result holds each attempt's RMS distance (``rms``: None where it
    did not match or neither rule let it be matched) and its verdict under each rule (``valid``,
    ``published_valid``)."""
    n = max((len(r["rms"]) for r in results), default=1)
    rms = [r["rms"] for r in results]
    ours, published = [r["valid"] for r in results], [r["published_valid"] for r in results]
    attempts = sum(len(v) for v in ours)
    rate_1, rmse_1 = score(keep(rms, ours), 1)
    rate_n, rmse_n = score(keep(rms, ours), n)
    pub_1, pub_rmse_1 = score(keep(rms, published), 1)
    pub_n, pub_rmse_n = score(keep(rms, published), n)
    return CspResult(
        structures=len(results),
        attempts=attempts,
        match_rate_1=rate_1,
        rmse_1=rmse_1,
        match_rate_n=rate_n,
        rmse_n=rmse_n,
        validity=sum(map(sum, ours)) / attempts if attempts else 0.0,
        samples_per_s=samples_per_s,
        published_match_rate_1=pub_1,
        published_rmse_1=pub_rmse_1,
        published_match_rate_n=pub_n,
        published_rmse_n=pub_rmse_n,
        published_validity=sum(map(sum, published)) / attempts if attempts else 0.0,
        match_timeouts=sum(r["timeouts"] for r in results),
    )


def score(rms: list[list[float | None]], n: int) -> tuple[float, float | None]:
    best = [min((r for r in row[:n] if r is not None), default=None) for row in rms]
    matched = [b for b in best if b is not None]
    rate = len(matched) / len(rms) if rms else 0.0
    return rate, (sum(matched) / len(matched) if matched else None)


def run_csp(
    model_path: str,
    test: str,
    n: int,
    limit: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    out: Path | None = None,
    max_tokens: int | None = None,
    sink: JsonlSink | None = None,
    shard: Shard | None = None,
    test_split: str | None = None,
    kv_cache: str = "auto",
) -> CspResult:
    """The benchmark over the test structures (the first ``limit``), or over ``shard``'s part of them; with
    ``out``, its per-structure results too (what ``crystallm merge csp`` joins). With ``test_split``, ``test``
    is a prepared data set and the structures are that split of it. Progress of its sampling and
    matching goes to ``sink`` (and a bar on a terminal)."""
    from pymatgen.core import Structure

    from crystallm_core.cif import canonicalize
    from crystallm_core.evaluate import check_texts
    from crystallm_core.inputs import read_input
    from crystallm_core.sample import generate, load_for_inference
    from crystallm_core.sampler import Sampler, SamplingParams

    if test_split is not None:
        from crystallm_core.prepare import split_cifs

        truths = split_cifs(test, test_split)[:limit]
    else:
        truths = []
        for rec in read_input(test):
            if limit is not None and len(truths) >= limit:
                break
            truths.append(rec.text)
    part = range(len(truths)) if shard is None else shard.part(len(truths))
    truths = truths[part.start : part.stop]
    prompts: list[tuple[str, str | None]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in truths:
            prompts.append((canonicalize(Structure.from_str(text, fmt="cif")).formula.replace(" ", ""), None))
    clock = time.perf_counter()

    def phase(what: str) -> None:
        print(f"csp: {what} ({time.perf_counter() - clock:.0f} s)", file=sys.stderr, flush=True)

    phase(f"{len(truths)} test structures read")
    model, vocab, _ = load_for_inference(model_path, device)
    on_gpu = next(model.parameters()).device.type == "cuda"
    sampler = Sampler(model, vocab, batch_size=batch_size or (1024 if on_gpu else 32), kv_cache=kv_cache)
    length = min(model.cfg.block_size, max_tokens or model.cfg.block_size)  # default: up to the whole context
    params = SamplingParams(temperature=temperature, top_k=top_k, seed=seed, max_tokens=length)
    with ProgressReporter(sink, "csp sample", n * len(prompts)) as progress:
        samples, stats = generate(sampler, prompts, n, params, progress.update, first_prompt=part.start)
    cifs = [s.cif for s in samples]
    phase(f"{len(cifs)} samples generated ({stats.samples_per_s:.0f}/s)")
    workers = workers or os.cpu_count() or 1
    ours = [v.is_valid for v in check_texts(cifs, workers)]
    published = check_published_texts(cifs, workers)
    phase("validity checked (both rules)")
    either = [c if a or b else None for c, a, b in zip(cifs, ours, published)]  # each attempt matched once
    with ProgressReporter(sink, "csp match", len(truths)) as progress:
        jobs = [(truths[i], either[i * n : (i + 1) * n]) for i in range(len(truths))]
        rms, timeouts = match_all(jobs, workers, progress.update)
    phase(f"matched ({sum(timeouts)} attempts ran out of {MATCH_TIMEOUT_S:g} s)")
    per_structure = [
        {
            "index": t,
            "formula": p[0],
            "valid": ours[k * n : (k + 1) * n],
            "published_valid": published[k * n : (k + 1) * n],
            "rms": r,
            "timeouts": timeouts[k],
        }
        for k, (t, p, r) in enumerate(zip(part, prompts, rms))
    ]
    result = figures(per_structure, stats.samples_per_s)
    if out is not None:
        from crystallm_core.sample import write_samples

        write_samples(samples, out / CSP_SAMPLES)
        write_csp_results(out / CSP_RESULTS, per_structure)
        (out / CSP_REPORT).write_text(json.dumps(asdict(result), indent=2) + "\n", encoding="utf-8")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    from crystallm_core.sampler import KV_CACHE_CHOICES  # torch: only when the verb is `benchmark`

    p.add_argument("task", choices=["csp"], help="benchmark to run")
    p.add_argument("--model", required=True, help="checkpoint (.pt)")
    p.add_argument(
        "--test",
        required=True,
        help="CSV(.gz) with a cif column, a directory or a tarball; with --test-split, a data set",
    )
    p.add_argument(
        "--test-split",
        choices=["train", "val", "test"],
        default=None,
        help="benchmark this split of the prepared data set --test (a held-out part of one input file)",
    )
    p.add_argument("--n", type=int, default=20, help="attempts per composition")
    p.add_argument("--limit", type=int, default=None, help="first LIMIT test structures only")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens only")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="slots generated together (default: 1024 GPU, 32 CPU)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the validity checks and structure matching (default: all cores)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument(
        "--kv-cache", choices=KV_CACHE_CHOICES, default="auto", help="key/value cache type (auto: fp8 on a GPU)"
    )
    p.add_argument("--out", default=None, help="directory for samples.csv.gz, results.jsonl and csp.json")
    p.add_argument(
        "--smoke", action="store_true", help=f"8 test structures, 2 attempts each of at most {SMOKE_TOKENS} tokens"
    )
    add_shard_argument(p, "test structures (after --limit)")


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        print("crystallm benchmark: --n must be >= 1", file=sys.stderr)
        return 2
    n, limit = (min(args.n, 2), min(args.limit or 8, 8)) if args.smoke else (args.n, args.limit)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sink = open_sink(out or Path(".")) if out is not None or os.environ.get("CRYSTALLM_EVENTS") else None
    try:
        result = run_csp(
            args.model,
            args.test,
            n,
            limit,
            args.temperature,
            args.top_k,
            args.seed,
            args.batch_size,
            args.workers,
            args.device,
            out,
            SMOKE_TOKENS if args.smoke else None,
            sink,
            args.shard,
            args.test_split,
            args.kv_cache,
        )
        if sink is not None:
            sink.metric(0, **{k: v for k, v in asdict(result).items() if v is not None})
            if out is not None:
                sink.artifact(out / "csp.json", "report")
    except (ValueError, FileNotFoundError) as e:
        print(f"crystallm benchmark: {e}", file=sys.stderr)
        return 2
    finally:
        if sink is not None:
            sink.close()
    print(json.dumps(asdict(result)))
    return 0
