"""The ``chgnet`` scorer: CHGNet's predicted energy per atom (eV/atom) of each CIF's structure.

CHGNet (PyPI ``chgnet``, the ``chgnet`` extra of this package) is a universal interatomic potential
whose pretrained weights ship inside its wheel, so nothing is downloaded at run time. Each CIF is
read with :func:`crystallm_core.cif.parse_structure` and turned into a crystal graph on its own, so
a structure that cannot be read or has isolated atoms fails alone with its reason; the graphs that
were built are predicted together in batches of ``batch_size`` on the GPU when there is one.

Reading a CIF and building its graph is Python work on the CPU (about 1-2 ms a structure on one
core), so with ``workers`` > 0 it runs on a pool of that many processes (default: up to 8 when
predicting on a GPU; none on a CPU, where prediction itself takes a few ms a structure). Graphs
cross from the pool as numpy arrays: torch tensors would travel through shared-memory files (3.7 ms
a graph to pickle and unpickle, against 0.7 ms for plain arrays, on a development CPU). CHGNet's own
batching (``predict_graph``) featurizes graph by graph, a few dozen small kernels each;
:func:`predict_energies` assembles a whole batch with numpy offsets instead and featurizes it in
one pass with CHGNet's own encoders, then runs the model on it (the same energies to float
rounding, a test). On an H200 that scores ~2,100 CIFs/s against ~260/s through CHGNet's own API
(docs/BENCHMARKS.md). The model loads when the scorer is made (seconds) and stays loaded, with its
pool, for the scorer's life.

A batch is bounded by memory, not only by count: what prediction holds grows with the graph's directed
bonds (6 Å cutoff) and angles (pairs of 3 Å bonds at an atom), and a dense carbon cell has ~50 times the
angles of a perovskite of the same atom count (128 dense carbon_24 cells in one batch peaked at 11.5 GB
on a CPU). Each graph's cost is estimated from those two counts (:data:`BYTES_PER_EDGE`, measured), and a
batch is closed before it would pass ``max_batch_mib`` (default: a quarter of the memory free on the
device when the scorer is made, at most 8 GiB on a CPU); a single graph above the budget fails alone with
its size instead of exhausting the node.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from crystallm_core.scorers import Scorer, ScorerError, ScoreResult, failure, register_scorer

if TYPE_CHECKING:
    import torch

MODELS = ("0.3.0", "0.2.0", "r2scan")  # the weights a chgnet wheel carries
MIN_PARALLEL = 16  # smaller batches are converted in this process: a pool round trip costs more
# Peak memory of predict_energies per directed bond plus angle: 3.6 KB and 3.3 KB measured on a CPU (float32,
# carbon_24 and perov_5 batches of 4-128 graphs, 0.15-1.5 GB), rounded up; bench/scorer.py reports the peak.
BYTES_PER_EDGE = 4096
CPU_BUDGET_CAP_MIB = 8192

_converter: Any = None  # a pool worker's copy of the model's graph converter


# A crystal graph's arrays: (name, dtype, trailing shape). Index arrays are per-graph numbering.
GRAPH_ARRAYS = (
    ("atomic_number", np.int32, ()),
    ("atom_frac_coord", np.float32, (3,)),
    ("lattice", np.float32, (3,)),
    ("atom_graph", np.int32, (2,)),  # directed bonds: (center atom, neighbor atom)
    ("neighbor_image", np.float32, (3,)),  # the neighbor's periodic image, per directed bond
    ("directed2undirected", np.int32, ()),
    ("undirected2directed", np.int32, ()),
    ("bond_graph", np.int32, (5,)),  # angles: (atom, undirected i, directed i, undirected j, directed j)
)
Graph = dict[str, np.ndarray]


def build_graph(converter: Any, text: str, max_atoms: int) -> Graph | ScoreResult:
    """The crystal graph of a CIF as arrays (:data:`GRAPH_ARRAYS`), or a failure saying why there is none."""
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
            graph = converter(structure, graph_id="scored")
        except Exception as exc:  # isolated atoms, degenerate cells: CHGNet raises ValueError/RuntimeError
            return failure(f"no crystal graph: {str(exc).splitlines()[0][:200]}")
    # Empty bond or angle lists come back 1-D (and as floats); give every array its full shape.
    return {
        name: getattr(graph, name).detach().numpy().astype(dtype, copy=False).reshape(-1, *shape)
        for name, dtype, shape in GRAPH_ARRAYS
    }


def _offsets(counts: np.ndarray, repeats: np.ndarray) -> np.ndarray:
    """Each graph's first global index (exclusive cumulative sum of ``counts``), once per item it owns."""
    starts = np.cumsum(counts) - counts
    return np.repeat(starts, repeats).astype(np.int32)


def predict_energies(model: Any, graphs: Sequence[Graph]) -> np.ndarray:
    """Energy per atom (eV/atom) of each graph, the batch assembled and featurized at once.

    This is what ``CHGNet.predict_graph(graphs, task="e")`` computes: the same encoders, the same
    model body (``_compute``) and the same composition model, but the per-graph loop of CHGNet's
    ``BatchedGraph.from_graphs`` becomes a handful of whole-batch operations: indices are shifted to
    batch numbering with numpy, every array crosses to the device once, and each bond's periodic
    image is turned into Cartesian coordinates with its own graph's lattice.
    """
    import torch
    from chgnet.model.model import BatchedGraph

    with torch.no_grad():
        device = next(model.parameters()).device

        def sizes(name: str) -> np.ndarray:
            return np.array([len(g[name]) for g in graphs])

        def cat(name: str) -> np.ndarray:
            return np.concatenate([g[name] for g in graphs])

        n_atoms, n_bonds, n_angles = sizes("atomic_number"), sizes("atom_graph"), sizes("bond_graph")
        n_undirected = sizes("undirected2directed")
        atom_graph = cat("atom_graph") + _offsets(n_atoms, n_bonds)[:, None]
        d2u = cat("directed2undirected") + _offsets(n_undirected, n_bonds)
        u2d = cat("undirected2directed") + _offsets(n_bonds, n_undirected)
        angles = cat("bond_graph")
        angles[:, 0] += _offsets(n_atoms, n_angles)
        angles[:, [1, 3]] += _offsets(n_undirected, n_angles)[:, None]
        angles[:, [2, 4]] += _offsets(n_bonds, n_angles)[:, None]

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

        atomic_number, frac, image = dev(cat("atomic_number")), dev(cat("atom_frac_coord")), dev(cat("neighbor_image"))
        lattice = dev(np.stack([g["lattice"] for g in graphs]))  # [graphs, 3, 3]
        owner = dev(np.repeat(np.arange(len(graphs), dtype=np.int32), n_atoms))
        atom_graph_t, angles_t = dev(atom_graph), dev(angles)
        cart = torch.einsum("ni,nij->nj", frac, lattice[owner])
        bond_owner = owner[atom_graph_t[:, 0]]
        image_cart = torch.einsum("ni,nij->nj", image, lattice[bond_owner])
        # Images are already Cartesian, so the encoder's lattice is the identity (an exact product).
        bases_ag, bases_bg, bond_vectors = model.bond_basis_expansion(
            center=cart[atom_graph_t[:, 0]],
            neighbor=cart[atom_graph_t[:, 1]],
            undirected2directed=dev(u2d),
            image=image_cart,
            lattice=torch.eye(3, dtype=cart.dtype, device=device),
        )
        if len(angles):
            angle_bases = model.angle_basis_expansion(bond_vectors[angles_t[:, 2]], bond_vectors[angles_t[:, 4]])
            bond_graph = angles_t[:, [0, 1, 3]].contiguous()
        else:  # CHGNet's marker for "no angles in the batch"
            angle_bases = bond_graph = torch.tensor([], device=device)
        volumes = (lattice[:, 0] * torch.linalg.cross(lattice[:, 1], lattice[:, 2])).sum(-1)
        batch = BatchedGraph(
            atomic_numbers=atomic_number,
            bond_bases_ag=bases_ag,
            bond_bases_bg=bases_bg,
            angle_bases=angle_bases,
            batched_atom_graph=atom_graph_t,
            batched_bond_graph=bond_graph,
            atom_owners=owner,
            directed2undirected=dev(d2u),
            atom_positions=list(torch.split(cart, n_atoms.tolist())),
            strains=[None] * len(graphs),
            volumes=volumes,
        )
        energy = model._compute(batch)["e"]
        comp = model.composition_model
        if comp is not None:  # a linear model of the composition (per atom when the model is intensive)
            feas = torch.zeros(len(graphs), comp.max_num_elements, device=device)
            feas.index_put_((owner.long(), atomic_number.long() - 1), torch.ones_like(cart[:, 0]), accumulate=True)
            if comp.is_intensive:
                feas /= dev(n_atoms.astype(np.float32))[:, None]
            energy = energy + comp._get_energy(feas)
        return energy.float().cpu().numpy()


def graph_bytes(graph: Graph) -> int:
    """Estimated peak memory of predicting ``graph`` in a batch (:data:`BYTES_PER_EDGE`)."""
    return BYTES_PER_EDGE * (len(graph["atom_graph"]) + len(graph["bond_graph"]))


def plan_batches(costs: Sequence[int], batch_size: int, budget: int) -> list[range]:
    """Consecutive batches of at most ``batch_size`` items whose ``costs`` add up to at most ``budget``; an
    item dearer than the budget alone is left out of every batch (the caller fails it)."""
    batches: list[range] = []
    start, total = 0, 0
    for i, cost in enumerate(costs):
        if cost > budget:
            if start < i:
                batches.append(range(start, i))
            start, total = i + 1, 0
            continue
        if i - start >= batch_size or total + cost > budget:
            batches.append(range(start, i))
            start, total = i, 0
        total += cost
    if start < len(costs):
        batches.append(range(start, len(costs)))
    return batches


def default_budget_mib(device: str) -> int:
    """A quarter of the memory free on ``device`` now (the rest is the sampler's, the pool's, the system's)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(1, free // 4 // 2**20)
    import psutil

    return max(1, min(CPU_BUDGET_CAP_MIB, psutil.virtual_memory().available // 4 // 2**20))


def _start_worker(converter: Any) -> None:
    global _converter
    import torch

    torch.set_num_threads(1)  # many workers: one thread each
    _converter = converter


def _worker_graph(job: tuple[str, int]) -> Graph | ScoreResult:
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
        max_batch_mib: int | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"option model must be one of {', '.join(MODELS)}, got {model!r}")
        if batch_size < 1 or max_atoms < 1:
            raise ValueError("options batch_size and max_atoms must be positive")
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise ValueError(f"option workers must be an integer >= 0, got {workers!r}")
        if max_batch_mib is not None and (not isinstance(max_batch_mib, int) or max_batch_mib < 1):
            raise ValueError(f"option max_batch_mib must be an integer >= 1, got {max_batch_mib!r}")
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
        self.max_batch_mib = max_batch_mib or default_budget_mib(device)
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 0:  # a clean process per worker: this one may hold a CUDA context, which fork cannot copy
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            self.pool = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_start_worker, initargs=(self.model.graph_converter,)
            )

    def _graphs(self, cifs: Sequence[str]) -> list[Graph | ScoreResult]:
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
        budget = self.max_batch_mib * 2**20
        costs = [graph_bytes(g) for g in graphs]
        for i, cost in zip(where, costs):
            if cost > budget:
                results[i] = failure(
                    f"crystal graph needs ~{cost / 2**20:.0f} MiB to predict, above the scorer's memory budget of "
                    f"{self.max_batch_mib} MiB (option max_batch_mib)"
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for batch in plan_batches(costs, self.batch_size, budget):
                energies = predict_energies(self.model, [graphs[k] for k in batch])
                for k, e in zip(batch, energies, strict=True):
                    results[where[k]] = ScoreResult(score=float(e))
        return [r for r in results if r is not None]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        self.model = None


register_scorer("chgnet", ChgnetScorer)
