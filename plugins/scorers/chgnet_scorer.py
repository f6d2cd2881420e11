"""The ``chgnet`` scorer: CHGNet's predicted energy per atom (eV/atom) of each CIF's structure.

CHGNet (PyPI ``chgnet``, the ``chgnet`` extra of this package) is a universal interatomic potential
whose pretrained weights ship inside its wheel, so nothing is downloaded at run time. Each CIF is
read with :func:`crystallm_core.cif.parse_structure` and turned into a crystal graph one by one, so
a structure that cannot be read or has isolated atoms fails alone with its reason; the graphs that
were built are predicted together in batches of ``batch_size`` on the GPU when there is one.

The model loads when the scorer is made (seconds) and stays loaded for the scorer's life.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

from crystallm_core.scorers import Scorer, ScorerError, ScoreResult, failure, register_scorer

MODELS = ("0.3.0", "0.2.0", "r2scan")  # the weights a chgnet wheel carries


class ChgnetScorer(Scorer):
    name = "chgnet"

    def __init__(self, device: str = "auto", batch_size: int = 64, model: str = "0.3.0", max_atoms: int = 500) -> None:
        if model not in MODELS:
            raise ValueError(f"option model must be one of {', '.join(MODELS)}, got {model!r}")
        if batch_size < 1 or max_atoms < 1:
            raise ValueError("options batch_size and max_atoms must be positive")
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

    def _graph(self, text: str) -> Any:
        """The crystal graph of a CIF, or a failure reason."""
        from crystallm_core.cif import CifError, parse_structure

        try:
            structure = parse_structure(text)
        except CifError as exc:
            return failure(f"unparseable: {exc}")
        if len(structure) > self.max_atoms:
            return failure(f"{len(structure)} atoms exceed max_atoms={self.max_atoms}")
        try:
            return self.model.graph_converter(structure, graph_id="scored")
        except Exception as exc:  # isolated atoms, degenerate cells: CHGNet raises ValueError/RuntimeError
            return failure(f"no crystal graph: {str(exc).splitlines()[0][:200]}")

    def score(self, cifs: Sequence[str]) -> list[ScoreResult]:
        results: list[ScoreResult | None] = [None] * len(cifs)
        graphs, where = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen and torch warn about odd generated structures
            for i, text in enumerate(cifs):
                g = self._graph(text)
                if isinstance(g, ScoreResult):
                    results[i] = g
                else:
                    graphs.append(g)
                    where.append(i)
            if graphs:
                preds = self.model.predict_graph(graphs, task="e", batch_size=self.batch_size)
                preds = [preds] if isinstance(preds, dict) else preds
                for i, p in zip(where, preds, strict=True):
                    results[i] = ScoreResult(score=float(p["e"]))
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.model = None


register_scorer("chgnet", ChgnetScorer)
