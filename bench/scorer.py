"""Scorer throughput: CIFs scored per second, and for ``chgnet`` the same CIFs through CHGNet's own API.

Reads CIFs from any ``crystallm prepare`` input (a CSV with a ``cif`` column such as
``../shared/data/perov_5/test.csv.gz``, a directory, a tarball), warms the scorer up on one batch,
then times ``score`` over all of them in calls of ``--call-size`` CIFs (one MCTS step's worth). For
``chgnet`` it also times, in the same process on the same device, what CHGNet's own API does with
the same CIFs (parse each CIF, ``CHGNet.predict_structure`` in batches of the same size) and
reports the largest difference between the two energies. Prints one JSON line.

    python bench/scorer.py --scorer chgnet --cifs ../shared/data/perov_5/test.csv.gz --n 4096 \
        --call-size 1024 --scorer-option batch_size=256

``peak_rss_mib`` is this process's peak resident memory after the timed scoring (before CHGNet's own
path runs, whose batches are bounded by count only); on a GPU the batches live in device memory instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings

import torch

from crystallm_core.inputs import read_input
from crystallm_core.scorers import make_scorer, parse_options, score_checked
from crystallm_core.train import resolve_device


def read_cifs(path: str, n: int) -> list[str]:
    cifs = [record.text for record in read_input(path)]
    return (cifs * (n // len(cifs) + 1))[:n]  # repeat a short file: a scorer caches nothing


def chgnet_itself(model: object, cifs: list[str], batch_size: int) -> tuple[float, list[float]]:
    """Seconds and energies of CHGNet's own path: parse, ``predict_structure`` (graphs built in this process)."""
    from crystallm_core.cif import parse_structure

    t = time.perf_counter()
    structures = [parse_structure(c) for c in cifs]
    preds = model.predict_structure(structures, task="e", batch_size=batch_size)
    return time.perf_counter() - t, [float(p["e"]) for p in preds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scorer", default="chgnet")
    ap.add_argument("--scorer-option", action="append", default=[], metavar="K=V")
    ap.add_argument("--cifs", required=True, help="CSV with a cif column, directory or tarball of CIFs")
    ap.add_argument("--n", type=int, default=4096, help="CIFs to score (the file is repeated if shorter)")
    ap.add_argument("--call-size", type=int, default=1024, help="CIFs per score() call")
    ap.add_argument("--baseline-n", type=int, default=None, help="CIFs for CHGNet's own path (default: --n)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-baseline", action="store_true", help="skip CHGNet's own path (its batches are not bounded)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    cifs = read_cifs(args.cifs, args.n)
    device = str(resolve_device(args.device))
    out: dict[str, object] = {"scorer": args.scorer, "device": device, "cifs": len(cifs), "call_size": args.call_size}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    with make_scorer(args.scorer, parse_options(args.scorer_option, "--scorer-option"), device=device) as scorer:
        score_checked(scorer, cifs[: args.call_size])  # warm-up: the model, the pool, the kernels
        t = time.perf_counter()
        results = []
        for start in range(0, len(cifs), args.call_size):
            results += score_checked(scorer, cifs[start : start + args.call_size])
        seconds = time.perf_counter() - t
        out.update(seconds=round(seconds, 3), per_s=round(len(cifs) / seconds, 1))
        out["failed"] = sum(not r.ok for r in results)
        # Peak resident memory of this process so far: the model, the pool's parent side and every batch.
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        if hasattr(scorer, "max_batch_mib"):
            out["max_batch_mib"] = scorer.max_batch_mib
        if args.scorer == "chgnet" and not args.no_baseline:
            n = args.baseline_n or len(cifs)
            model = scorer.model  # type: ignore[attr-defined]  (the chgnet scorer holds its model)
            chgnet_itself(model, cifs[: args.call_size], scorer.batch_size)  # its warm-up
            base_s, energies = chgnet_itself(model, cifs[:n], scorer.batch_size)
            ours = [r.score for r in results[:n]]
            out["chgnet_itself"] = {"cifs": n, "seconds": round(base_s, 3), "per_s": round(n / base_s, 1)}
            out["speedup"] = round(out["per_s"] / out["chgnet_itself"]["per_s"], 2)
            out["max_abs_diff_ev_per_atom"] = max(
                abs(a - b) for a, b in zip(ours, energies, strict=True) if a is not None
            )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
