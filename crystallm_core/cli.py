"""The ``crystallm`` command line.

Each verb lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their verb runs, so
``crystallm evaluate`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("crystallm_core.prepare", "prepare raw structures into a data set (store + token files)"),
    "evaluate": ("crystallm_core.evaluate", "check CIFs for validity and summarise"),
    "demo-data": ("crystallm_core.demo", "write the built-in demo data set"),
    "train": ("crystallm_core.train", "train a model on a prepared data set"),
    "sample": ("crystallm_core.sample", "generate CIFs for compositions"),
    "benchmark": ("crystallm_core.csp", "crystal-structure prediction benchmark (csp)"),
    "export": ("crystallm_core.checkpoint", "write an inference-only copy of a checkpoint (weights, config)"),
    "plot": ("crystallm_core.plots", "draw a run's training curves (loss, learning rate, throughput) as PNGs"),
    "probes": ("crystallm_core.analysis", "analyse activation probes: ΦID atoms between modules (omegaid)"),
    "mcts": ("crystallm_core.mcts", "Monte-Carlo tree search for low-scoring (stable) structures"),
    "scorer": ("crystallm_core.scorer_server", "serve a scorer over ZeroMQ, or score CIF files"),
    "merge": ("crystallm_core.shards", "join the outputs of a run's parts (--shard I/S) into the whole run's"),
    "plugins": ("crystallm_core.plugins", "list registered scorers, vocabularies, models, metrics, stages"),
}
# Verbs that may use a plugin's scorer, vocabulary, model size or metric load plugins first.
PLUGIN_VERBS = {"prepare", "evaluate", "train", "sample", "benchmark", "export", "mcts", "scorer"}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    from crystallm_core import __version__

    parser = argparse.ArgumentParser(prog="crystallm", description="CrystaLLM-style language models of CIF files")
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (module, help_text) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb not in VERBS:
        verb = None
    args = build_parser(verb).parse_args(argv)
    if args.verb is None:
        build_parser().print_help()
        return 2
    if args.verb in PLUGIN_VERBS:
        from crystallm_core.plugins import load_for_cli

        load_for_cli()
    return int(importlib.import_module(VERBS[args.verb][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
