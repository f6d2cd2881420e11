"""The ``chgnet`` scorer: CHGNet's predicted energy per atom (eV/atom) of each CIF's structure.

CHGNet (PyPI ``chgnet``, the ``chgnet`` extra of this package) is a universal interatomic potential
whose pretrained weights ship inside its wheel, so nothing is downloaded at run time. Each CIF is
read with :func:`crystallm_core.cif.parse_structure` and turned into a crystal graph on its own, so
a structure that cannot be read or has isolated atoms fails alone with its reason; the graphs that
were built are predicted together in batches of ``batch_size`` on the GPU when there is one.

Reading a CIF and building its graph is Python work on the CPU (about 2 ms a structure on one
core), so with ``workers`` > 0 it runs on a pool of that many processes (default: up to 8 when
predicting on a GPU; none on a CPU, where prediction itself takes ~25 ms a structure). On an H200
the prediction still bounds the scorer at ~195 structures/s (docs/BENCHMARKS.md). The model loads
when the scorer is made (seconds) and stays loaded, with its pool, for the scorer's life.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from crystallm_core.scorers import Scorer, ScorerError, ScoreResult, failure, register_scorer

MODELS = ("0.3.0", "0.2.0", "r2scan")  # the weights a chgnet wheel carries
MIN_PARALLEL = 16  # smaller batches are converted in this process: a pool round trip costs more

_converter: Any = None  # a pool worker's copy of the model's graph converter


def build_graph(converter: Any, text: str, max_atoms: int) -> Any:
    """The crystal graph of a CIF, or a failure saying why there is none."""
    from crystallm_core.cif import CifError, parse_structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen and torch warn about odd generated structures
        try:
            structure = parse_structure(text)
        except CifError as exc:
            return failure(f"unparseable: {exc}")
        if len(structure) > max_atoms:
            return failure(f"{len(structure)} atoms exceed max_atoms={max_atoms}")
        try:
            return converter(structure, graph_id="scored")
        except Exception as exc:  # isolated atoms, degenerate cells: CHGNet raises ValueError/RuntimeError
            return failure(f"no crystal graph: {str(exc).splitlines()[0][:200]}")


def _start_worker(converter: Any) -> None:
    global _converter
    import torch

    torch.set_num_threads(1)  # many workers: one thread each
    _converter = converter


def _worker_graph(job: tuple[str, int]) -> Any:
    return build_graph(_converter, *job)


class ChgnetScorer(Scorer):
    name = "chgnet"

    def __init__(
        self,
        device: str = "auto",
        batch_size: int = 64,
        model: str = "0.3.0",
        max_atoms: int = 500,
        workers: int | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"option model must be one of {', '.join(MODELS)}, got {model!r}")
        if batch_size < 1 or max_atoms < 1:
            raise ValueError("options batch_size and max_atoms must be positive")
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise ValueError(f"option workers must be an integer >= 0, got {workers!r}")
        try:
            import torch
            from chgnet.model import CHGNet
        except ImportError as exc:
            raise ScorerError(
                f"the chgnet scorer needs the chgnet package ({exc}); pip install 'infra[chgnet]'"
            ) from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count on load
            self.model: Any = CHGNet.load(model_name=model, use_device=device, verbose=False)
        self.device, self.batch_size, self.max_atoms = device, batch_size, max_atoms
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:  # a clean process per worker: this one may hold a CUDA context, which fork cannot copy
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            self.pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_start_worker, initargs=(self.model.graph_converter,)
            )

    def _graphs(self, cifs: Sequence[str]) -> list[Any]:
        jobs = [(text, self.max_atoms) for text in cifs]
        if self.pool is None or len(jobs) < MIN_PARALLEL:
            return [build_graph(self.model.graph_converter, *job) for job in jobs]
        return list(self.pool.map(_worker_graph, jobs, chunksize=max(1, len(jobs) // (4 * self.workers))))

    def score(self, cifs: Sequence[str]) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(cifs)
        graphs, where = [], []
        for i, g in enumerate(self._graphs(cifs)):
            if isinstance(g, ScoreResult):
                results[i] = g
            else:
                graphs.append(g)
                where.append(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if graphs:
                preds = self.model.predict_graph(graphs, task="e", batch_size=self.batch_size)
                preds = [preds] if isinstance(preds, dict) else preds
                for i, p in zip(where, preds, strict=True):
                    results[i] = ScoreResult(score=float(p["e"]))
        return [r for r in results if r is not None]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        self.model = None


register_scorer("chgnet", ChgnetScorer)
