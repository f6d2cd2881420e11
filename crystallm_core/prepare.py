"""``crystallm prepare``: raw crystal structures in, a prepared data set out.

Pipeline (docs/DATA.md): read inputs -> parse and canonicalize in a process pool (failures go
to ``rejects.csv``) -> store -> optional dedup -> splits -> token files of the selected
structures -> ``selection.json`` (which structures, chosen how, from which sources) -> ``meta.json``.
The output directory either ends up holding a complete data set or, if the run fails, none of this
run's files (``events.jsonl`` excepted: it is the run's log).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from itertools import islice
from multiprocessing import Pool
from multiprocessing.pool import AsyncResult
from multiprocessing.pool import Pool as PoolType
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np
from pymatgen.core import Structure

from crystallm_core import __version__
from crystallm_core.augment import AUGMENT_MAX, Variants, variants
from crystallm_core.cif import DEFAULT_DECIMALS, DEFAULT_SYMPREC, Canonical, canonicalize
from crystallm_core.events import JsonlSink, open_sink
from crystallm_core.inputs import Record, read_inputs
from crystallm_core.layout import SELECTION_JSON
from crystallm_core.registry import RegistryError
from crystallm_core.store import Filter, Row, Store, parse_filter, parse_filters
from crystallm_core.tokens import META, SPLITS, SplitCounts, bin_path, starts_path, write_meta, write_split
from crystallm_core.vocab import Vocabulary, get_vocab

STORE_NAME = "structures.sqlite"
REJECTS_NAME = "rejects.csv"
CHUNK = 32  # structures per pool task: large enough to amortize pickling and IPC, small enough to balance
TASKS_PER_WORKER = 4  # tasks in flight per worker: keeps workers busy without reading the whole input ahead
STORE_BATCH = 2000  # rows per store transaction
PROGRESS_EVERY_S = 1.0
REASON_MAX = 500
SMOKE_STRUCTURES = 64  # --smoke reads only this many structures of the inputs

T = TypeVar("T")
K = TypeVar("K")
A = TypeVar("A")
R = TypeVar("R")


class PrepareError(ValueError):
    """A run that cannot start or finish; the message says why."""


@dataclass
class PrepareReport:
    out: Path
    read: int
    rejected: int
    duplicates: int
    stored: int
    selected: int
    split_origin: str  # "input" (from CSV split columns) or "ratios"
    input_splits_ignored: int  # records whose CSV split was overridden because not all records had one
    splits: dict[str, SplitCounts]
    unknown: dict[str, int]
    seconds: float
    workers: int
    where: list[str] = field(default_factory=list)
    augment: int = 0  # variants wanted per training structure
    variants: int = 0  # variants written into train.bin
    variant_failures: int = 0  # drawn variants that failed the check and were skipped

    @property
    def rejects_path(self) -> Path:
        return self.out / REJECTS_NAME

    def summary(self) -> str:
        origin = "the input split column" if self.split_origin == "input" else "ratios"
        where = f"  (--where {' '.join(self.where)})" if self.where else ""
        lines = [
            f"prepared data set in {self.out}",
            f"  structures read        {self.read}",
            f"  rejected               {self.rejected}  ({self.rejects_path})",
            f"  removed as duplicates  {self.duplicates}",
            f"  stored                 {self.stored}",
            f"  in token files         {self.selected}{where}",
        ]
        if self.augment:
            wanted = self.augment * (self.splits["train"].cifs - self.variants)
            lines += [
                f"  train variants         {self.variants} of {wanted}  (--augment {self.augment})",
                f"  variants skipped       {self.variant_failures}  (failed the check)",
            ]
        lines.append(f"  splits from            {origin}")
        if self.input_splits_ignored:
            lines.append(
                f"  note: {self.input_splits_ignored} input split values were ignored: not every record had one"
            )
        for s in SPLITS:
            c = self.splits[s]
            lines.append(f"  {s:<5} {c.cifs:>8} CIFs {c.tokens:>12} tokens")
        unknown = ", ".join(f"{ch!r}: {n}" for ch, n in sorted(self.unknown.items())) or "none"
        lines.append(f"  unknown-token characters: {unknown}")
        return "\n".join(lines)


# ---------------------------------------------------------------- arguments


def parse_ratios(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); see :func:`check_ratios`."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PrepareError(f"split ratios {text!r}: not comma-separated numbers (e.g. 0.8,0.1,0.1)") from None
    return check_ratios(values)


def check_ratios(values: Sequence[float]) -> tuple[float, float, float]:
    """Three finite non-negative numbers summing to 1 (train, val, test)."""
    if len(values) != 3:
        raise PrepareError(f"split ratios {list(values)}: need 3 numbers (train, val, test), got {len(values)}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise PrepareError(f"split ratios {list(values)}: must be non-negative numbers")
    if abs(sum(values) - 1.0) > 1e-6:
        raise PrepareError(f"split ratios {list(values)}: must sum to 1 (sum is {sum(values):g})")
    return (float(values[0]), float(values[1]), float(values[2]))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def dataset_files(out: Path) -> list[Path]:
    """Every file a prepared data set may consist of."""
    names = [STORE_NAME, REJECTS_NAME, SELECTION_JSON, META]
    return [out / n for n in names] + [p for s in SPLITS for p in (bin_path(out, s), starts_path(out, s))]


# ---------------------------------------------------------------- splits


def assign_splits(ids: Iterable[str], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """Split of each id: a permutation seeded by ``seed`` of the sorted ids, cut at the ratios.

    The first round(n * train) permuted ids go to train, the next ones up to
    round(n * (train + val)) to val, the rest to test.
    """
    ordered = sorted(ids)
    n = len(ordered)
    perm = np.random.default_rng(seed).permutation(n)
    cut_train = int(ratios[0] * n + 0.5)
    cut_val = min(n, int((ratios[0] + ratios[1]) * n + 0.5))
    out = {}
    for rank, index in enumerate(perm):
        out[ordered[index]] = "train" if rank < cut_train else "val" if rank < cut_val else "test"
    return out


# ---------------------------------------------------------------- workers


@dataclass(frozen=True)
class _WorkerSettings:
    decimals: int = DEFAULT_DECIMALS
    symprec: float = DEFAULT_SYMPREC
    augment: int = 0
    seed: int = 0


_settings = _WorkerSettings()


def _init_worker(settings: _WorkerSettings) -> None:
    global _settings
    _settings = settings
    warnings.simplefilter("ignore")  # pymatgen warns about every CIF it has to fix up


def _reason(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text[:REASON_MAX]


def _canonicalize_one(text: str) -> Canonical | str:
    """The canonical form, or the reason it could not be made."""
    try:
        return canonicalize(Structure.from_str(text, fmt="cif"), _settings.decimals, _settings.symprec)
    except Exception as exc:  # any failure rejects this structure only
        return _reason(exc)


def _canonicalize_chunk(texts: list[str]) -> list[Canonical | str]:
    return [_canonicalize_one(t) for t in texts]


def _augment_chunk(items: list[tuple[str, str]]) -> list[Variants]:
    """Variants of (id, canonical CIF) pairs; a structure whose variants cannot be made gets none."""
    out = []
    for key, text in items:
        s = _settings
        try:
            out.append(variants(text, s.augment, s.seed, key, s.decimals, s.symprec))
        except Exception:  # an unforeseen failure costs this structure its variants (counted), not the run
            out.append(Variants([], s.augment))
    return out


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for r in items:
        chunk.append(r)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- the run


class _Progress:
    """Progress as events (throttled) and, when stderr is a terminal, as a rich bar."""

    def __init__(self, sink: JsonlSink, what: str, stack: ExitStack) -> None:
        self.sink, self.what = sink, what
        self.done = 0
        self.last = 0.0
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = stack.enter_context(Progress(console=Console(stderr=True)))
            self.task = self.bar.add_task(what, total=None)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.sink.progress(self.what, self.done, None)

    def finish(self) -> None:
        self.sink.progress(self.what, self.done, self.done)


@dataclass
class _Counts:
    read: int = 0
    rejected: int = 0


class _Collector:
    """Takes worker results in the main process: rows to the store in batches, failures to rejects.csv."""

    def __init__(self, store: Store, rejects: TextIO, progress: _Progress) -> None:
        self.store = store
        self.rejects = csv.writer(rejects)
        self.rejects.writerow(["id", "source", "reason"])
        self.progress = progress
        self.rows: list[Row] = []
        self.counts = _Counts()

    def reject(self, record: Record, reason: str) -> None:
        self.rejects.writerow([record.id, record.source, reason])
        self.counts.rejected += 1

    def refuse(self, record: Record, reason: str) -> None:
        """Reject a record that never reached a worker."""
        self.reject(record, reason)
        self.counts.read += 1
        self.progress.advance(1)

    def take(self, chunk: list[Record], results: list[Canonical | str]) -> None:
        for record, result in zip(chunk, results, strict=True):
            if isinstance(result, str):
                self.reject(record, result)
            else:
                self.rows.append(Row.from_canonical(record.id, record.source, result, record.split))
        self.counts.read += len(chunk)
        self.progress.advance(len(chunk))
        if len(self.rows) >= STORE_BATCH:
            self.flush()

    def flush(self) -> None:
        self.store.add_many(self.rows)
        self.rows = []


def _unique(records: Iterable[Record], collector: _Collector) -> Iterator[Record]:
    """Records whose id was not seen before; a repeated id is rejected (ids key the store)."""
    first_source: dict[str, str] = {}
    for r in records:
        if r.id in first_source:
            collector.refuse(r, f"duplicate id: {r.id!r} was already read from {first_source[r.id]}")
            continue
        first_source[r.id] = r.source
        yield r


def _in_order(pool: PoolType, fn: Callable[[A], R], tasks: Iterable[tuple[K, A]], window: int) -> Iterator[tuple[K, R]]:
    """``(key, fn(arg))`` for each ``(key, arg)`` of ``tasks``, in task order, with at most ``window`` tasks
    in flight: the input is streamed, never read ahead as a whole (``Pool.imap`` would)."""
    pending: deque[tuple[K, AsyncResult]] = deque()
    for key, arg in tasks:
        pending.append((key, pool.apply_async(fn, (arg,))))
        if len(pending) >= window:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


def _canonicalize_all(records: Iterator[Record], collector: _Collector, pool: PoolType, window: int) -> None:
    tasks = ((chunk, [r.text for r in chunk]) for chunk in _chunks(_unique(records, collector), CHUNK))
    for chunk, results in _in_order(pool, _canonicalize_chunk, tasks, window):
        collector.take(chunk, results)
    collector.flush()


class _Augmenter:
    """Streams the training rows through the pool and counts what their variants came to."""

    def __init__(self, pool: PoolType, window: int, progress: _Progress) -> None:
        self.pool, self.window, self.progress = pool, window, progress
        self.written = 0
        self.failures = 0

    def texts(self, rows: Iterable[Row]) -> Iterator[tuple[str, str]]:
        """(id, text) of each row's canonical CIF, each followed by its variants."""
        tasks = ((chunk, [(r.id, r.cif) for r in chunk]) for chunk in _chunks(rows, CHUNK))
        for chunk, results in _in_order(self.pool, _augment_chunk, tasks, self.window):
            for row, found in zip(chunk, results, strict=True):
                yield row.id, row.cif
                yield from ((row.id, text) for text in found.texts)
                self.written += len(found.texts)
                self.failures += found.failed
            self.progress.advance(len(chunk))


def _split_store(store: Store, ratios: Sequence[float], seed: int) -> tuple[str, int]:
    """Keep input splits if every stored structure has one, else assign all by ratios."""
    missing = store.unsplit_count()
    total = store.count()
    if total and not missing:
        return "input", 0
    store.set_splits(assign_splits(store.ids(), ratios, seed).items())
    return "ratios", total - missing


def _write_tokens(
    out: Path, store: Store, filters: list[Filter], vocab: Vocabulary, sink: JsonlSink, augmenter: _Augmenter | None
) -> tuple[dict[str, SplitCounts], Counter, dict[str, list[str]]]:
    """Token files of each split; also the ids written, in token-file order (CIF ``i`` is ``ids[split][i]``,
    so a training structure's id comes once for its canonical CIF and once for each of its variants)."""
    unknown: Counter = Counter()
    counts = {}
    ids: dict[str, list[str]] = {}

    def texts(split: str) -> Iterator[str]:
        rows = store.iter_rows([*filters, parse_filter(f"split={split}")])
        pairs = augmenter.texts(rows) if augmenter and split == "train" else ((r.id, r.cif) for r in rows)
        for key, text in pairs:
            ids[split].append(key)
            yield text

    for s in SPLITS:
        ids[s] = []
        counts[s] = write_split(out, s, texts(s), vocab, unknown)
        sink.progress("tokens", SPLITS.index(s) + 1, len(SPLITS))
    return counts, unknown, ids


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_digest(path: str | Path) -> str:
    """sha256 of an input file; of a directory, sha256 over 'relative path NUL sha256 LF' of its sorted .cif files."""
    p = Path(path)
    if not p.is_dir():
        return _sha256_file(p)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(".cif"))
    for f in files:
        h.update(f"{f.relative_to(p).as_posix()}\0{_sha256_file(f)}\n".encode())
    return h.hexdigest()


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    found = [p.name for p in dataset_files(out) if p.exists()]
    if found:
        raise PrepareError(
            f"--out {out}: already holds a prepared data set ({', '.join(found)}); "
            "choose another directory or remove it first"
        )


def _meta(
    report: PrepareReport,
    vocab: Vocabulary,
    sources: list[dict[str, str]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": "crystallm-data/1",
        "vocab_id": vocab.id,
        "eos_id": vocab.eos_id,
        "token_dtype": "uint16",
        "splits": {s: {"cifs": c.cifs, "tokens": c.tokens} for s, c in report.splits.items()},
        "sources": sources,
        "filters": report.where,
        **settings,
        "split_origin": report.split_origin,
        "counts": {
            "read": report.read,
            "rejected": report.rejected,
            "duplicates": report.duplicates,
            "stored": report.stored,
            "selected": report.selected,
            "variants": report.variants,
            "variant_failures": report.variant_failures,
        },
        "unknown_tokens": dict(sorted(report.unknown.items())),
        "store": STORE_NAME,
        "rejects": REJECTS_NAME,
        "crystallm_core_version": __version__,
    }


def _write_selection(out: Path, meta: dict[str, Any], ids: dict[str, list[str]]) -> None:
    """``selection.json``: which structures the data set is made of and how they were chosen, written
    atomically (the experiment record keeps it as ``data/selection.json``)."""
    keys = ("sources", "filters", "limit", "dedup", "split_origin", "split_ratios", "seed", "augment", "counts")
    selection = {"format": "crystallm-selection/1", **{k: meta[k] for k in keys}, "selected": ids}
    tmp = out / (SELECTION_JSON + ".tmp")
    tmp.write_text(json.dumps(selection, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / SELECTION_JSON)


def _emit_results(sink: JsonlSink, report: PrepareReport, out: Path) -> None:
    values: dict[str, float] = {
        "structures_read": report.read,
        "rejected": report.rejected,
        "duplicates": report.duplicates,
        "stored": report.stored,
        "selected": report.selected,
        "unknown_tokens": sum(report.unknown.values()),
        "seconds": report.seconds,
        "structures_per_s": report.read / report.seconds if report.seconds > 0 else 0.0,
    }
    for s, c in report.splits.items():
        values[f"{s}_cifs"] = c.cifs
        values[f"{s}_tokens"] = c.tokens
    sink.metric(0, **values)
    sink.artifact(out / STORE_NAME, "data")
    sink.artifact(out / REJECTS_NAME, "report")
    for s, c in report.splits.items():
        if c.cifs:
            sink.artifact(bin_path(out, s), "data")
            sink.artifact(starts_path(out, s), "data")
    sink.artifact(out / SELECTION_JSON, "data")
    sink.artifact(out / META, "data")


@dataclass(frozen=True)
class PrepareOptions:
    """How ``crystallm prepare`` canonicalizes, deduplicates, splits and selects; its CLI's defaults too."""

    decimals: int = DEFAULT_DECIMALS  # decimal places of every number
    workers: int | None = None  # worker processes (None: all cores)
    dedup: bool = False  # keep one structure per reduced formula and space group
    split: Sequence[float] = (0.8, 0.1, 0.1)  # train, val, test ratios
    seed: int = 0  # seed of the split permutation and of the variants
    where: Sequence[str] = ()  # FIELD=VALUE filters of what goes into the token files
    symprec: float = DEFAULT_SYMPREC  # spglib tolerance in Å
    vocab: str = "cif-v1"  # vocabulary of the token files
    limit: int | None = None  # read only the first ``limit`` structures of the inputs (recorded in meta.json)
    augment: int = 0  # equivalent texts added per training structure (crystallm_core/augment.py), seeded by ``seed``


@dataclass(frozen=True)
class _Job:
    """The checked options of one run, with what they resolve to."""

    options: PrepareOptions
    filters: list[Filter]
    vocab: Vocabulary
    workers: int
    ratios: tuple[float, float, float]


def _check(options: PrepareOptions) -> _Job:
    ratios = check_ratios(options.split)
    if options.limit is not None and options.limit < 1:
        raise PrepareError(f"limit must be at least 1, got {options.limit}")
    filters = parse_filters(list(options.where))
    if not 0 <= options.augment <= AUGMENT_MAX:
        raise PrepareError(f"augment must be between 0 and {AUGMENT_MAX}, got {options.augment}")
    if options.seed < 0:
        raise PrepareError(f"seed must be a non-negative integer, got {options.seed}")
    if options.decimals < 1:
        raise PrepareError(f"decimals must be at least 1, got {options.decimals}")
    if not (math.isfinite(options.symprec) and options.symprec > 0):
        raise PrepareError(f"symprec must be a positive number, got {options.symprec}")
    nworkers = default_workers() if options.workers is None else options.workers
    if nworkers < 1:
        raise PrepareError(f"workers must be at least 1, got {nworkers}")
    try:
        voc = get_vocab(options.vocab)
    except RegistryError as exc:
        raise PrepareError(str(exc)) from None
    return _Job(options, filters, voc, nworkers, ratios)


def prepare(
    inputs: Sequence[str | Path], out: str | Path, options: PrepareOptions | None = None, **settings: Any
) -> PrepareReport:
    """Prepare ``inputs`` into the data set directory ``out`` (see the module docstring) with ``options``;
    keyword ``settings`` replace single fields of it (``prepare(inputs, out, workers=1)``; an unknown name is a
    TypeError)."""
    job = _check(replace(options or PrepareOptions(), **settings))
    sources = [str(p) for p in inputs]
    records = read_inputs(sources)  # checks every input before anything is written
    if job.options.limit is not None:
        records = islice(records, job.options.limit)
    out = Path(out)
    _check_out(out)
    created_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(sources, records, out, job)
    except BaseException:
        for p in [*dataset_files(out), out / (META + ".tmp"), out / (SELECTION_JSON + ".tmp")]:
            p.unlink(missing_ok=True)
        if created_dir and not any(out.iterdir()):
            out.rmdir()
        raise


def _run(sources: list[str], records: Iterator[Record], out: Path, job: _Job) -> PrepareReport:
    opts = job.options
    started = time.monotonic()
    digests = [{"path": p, "sha256": source_digest(p)} for p in sources]
    window = job.workers * TASKS_PER_WORKER
    with ExitStack() as stack:
        # One pool for the whole run: it canonicalizes, then makes the variants of the training split.
        settings = _WorkerSettings(opts.decimals, opts.symprec, opts.augment, opts.seed)
        pool = stack.enter_context(Pool(job.workers, initializer=_init_worker, initargs=(settings,)))
        sink = stack.enter_context(open_sink(out))
        store = stack.enter_context(Store.create(out / STORE_NAME))
        rejects = stack.enter_context((out / REJECTS_NAME).open("x", encoding="utf-8", newline=""))
        progress = _Progress(sink, "canonicalize", stack)
        collector = _Collector(store, rejects, progress)
        _canonicalize_all(records, collector, pool, window)
        progress.finish()
        duplicates = len(store.remove_duplicates()) if opts.dedup else 0
        origin, ignored = _split_store(store, job.ratios, opts.seed)
        augmenter = _Augmenter(pool, window, _Progress(sink, "augment", stack)) if opts.augment else None
        counts, unknown, ids = _write_tokens(out, store, job.filters, job.vocab, sink, augmenter)
        if augmenter is not None:
            augmenter.progress.finish()
        variants = augmenter.written if augmenter else 0
        report = PrepareReport(
            out=out,
            read=collector.counts.read,
            rejected=collector.counts.rejected,
            duplicates=duplicates,
            stored=store.count(),
            selected=sum(c.cifs for c in counts.values()) - variants,  # structures, not texts
            split_origin=origin,
            input_splits_ignored=ignored,
            splits=counts,
            unknown=dict(unknown),
            seconds=time.monotonic() - started,
            workers=job.workers,
            where=[f.text for f in job.filters],
            augment=opts.augment,
            variants=variants,
            variant_failures=augmenter.failures if augmenter else 0,
        )
        settings = {
            "decimals": opts.decimals,
            "symprec": opts.symprec,
            "dedup": opts.dedup,
            "split_ratios": list(job.ratios) if origin == "ratios" else None,
            "seed": opts.seed if origin == "ratios" or opts.augment else None,
            "limit": opts.limit,
            "augment": opts.augment,
        }
        meta = _meta(report, job.vocab, digests, settings)
        _write_selection(out, meta, ids)
        write_meta(out, meta)
        _emit_results(sink, report, out)
    return report


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="directory of .cif files, .tar(.gz)/.tgz, .csv(.gz)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (must not hold a data set)")
    d = PrepareOptions()
    parser.add_argument("--decimals", type=int, default=d.decimals, help="decimal places of every number")
    parser.add_argument("--workers", type=int, default=d.workers, help="worker processes (default: all cores)")
    parser.add_argument("--dedup", action="store_true", help="keep one structure per reduced formula and space group")
    split = ",".join(f"{x:g}" for x in d.split)
    parser.add_argument("--split", default=split, metavar="TRAIN,VAL,TEST", help=f"split ratios (default {split})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split permutation and of the variants")
    parser.add_argument(
        "--augment",
        type=int,
        default=d.augment,
        metavar="K",
        help=f"add K equivalent texts of every training structure to train.bin (0..{AUGMENT_MAX})",
    )
    parser.add_argument(
        "--where",
        nargs="+",
        action="extend",
        default=[],
        metavar="FIELD=VALUE",
        help="select the structures that go into the token files (all must hold)",
    )
    parser.add_argument("--symprec", type=float, default=d.symprec, help="spglib tolerance in Å")
    parser.add_argument("--vocab", default=d.vocab, help="vocabulary of the token files")
    parser.add_argument(
        "--smoke", action="store_true", help=f"only the first {SMOKE_STRUCTURES} structures of the inputs"
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = PrepareOptions(
            decimals=args.decimals,
            workers=args.workers,
            dedup=args.dedup,
            split=parse_ratios(args.split),
            seed=args.seed,
            where=tuple(args.where),
            symprec=args.symprec,
            vocab=args.vocab,
            limit=SMOKE_STRUCTURES if args.smoke else None,
            augment=args.augment,
        )
        report = prepare(args.inputs, args.out, options)
    except (ValueError, OSError) as exc:  # InputError, PrepareError, filter and vocabulary errors included
        print(f"crystallm prepare: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.smoke:
        print(f"  smoke run: only the first {SMOKE_STRUCTURES} structures of the inputs were read")
    if report.selected == 0:
        print("crystallm prepare: error: no structure went into the token files", file=sys.stderr)
        return 1
    return 0


def split_cifs(data_dir: str | Path, split: str) -> list[str]:
    """The canonical CIFs of one split of a prepared data set, in store order: a held-out part of an input
    that has no test file of its own (carbon_24 here) is benchmarked from where ``prepare`` put it."""
    from crystallm_core.store import Store, parse_filter

    path = Path(data_dir) / STORE_NAME
    if not path.is_file():
        raise ValueError(f"{data_dir}: not a prepared data set (no {STORE_NAME})")
    with Store.open(path) as store:
        cifs = [row.cif for row in store.iter_rows([parse_filter(f"split={split}")])]
    if not cifs:
        raise ValueError(f"{data_dir}: its {split} split is empty")
    return cifs
