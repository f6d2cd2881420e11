"""``infra-train PLAN.json``: run a plan on this machine without a master.

Same validation, the same plugins and the same stage runner as the node agent; stages run one at a time
in dependency order in ``<workdir>/experiments/<experiment>/``, laid out as every experiment record is
(``crystallm_core/layout.py``: plan.json and env.json first, then data/, logs/, metrics/, ckpts/, ...).
The workdir is ``--workdir``, else the one set with ``infra-wkdir``, else ``./infra-work``; its stage
plugins (``plugins/stage/*.py``) are loaded like ``$INFRA_STAGE_MODULES``. A failed stage (after its
retries) stops the run; the stages that depend on it are skipped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crystallm_core.layout import experiment_dir
from crystallm_core.plugins import DEFAULT_TIMEOUT
from infra.node.stage_plugins import load_stage_modules, workdir_stage_plugins
from infra.spec.plan import (
    Plan,
    PlanError,
    force_smoke,
    load_plan_data,
    resolve_inputs,
    validate_plan,
    with_defaults,
)
from infra.spec.stages import get_stage_kind, world_size
from infra.wkdir import WorkdirError, get_workdir, prepare_workdir


@dataclass(frozen=True)
class LocalOptions:
    """infra-train's settings: one typed place, whose defaults are its flags' defaults."""

    workdir: str | None = None  # default: the one set with infra-wkdir, else FALLBACK_WORKDIR
    experiment: str | None = None  # the experiment directory's name; default: <plan name>-<date>-<time>
    quiet: bool = False  # do not echo the stages' output
    plugin_timeout: float = DEFAULT_TIMEOUT  # seconds a plugin may take to import
    smoke: bool = False  # run the plan in smoke mode whatever it says (no GPUs, tiny limits)


FALLBACK_WORKDIR = "infra-work"


def _printer(stage: str, quiet: bool) -> Any:
    metrics: list[dict[str, Any]] = []
    artifacts: list[dict[str, Any]] = []

    def emit(type_: str, body: dict[str, Any]) -> None:
        if type_ == "log" and not quiet:
            print(f"[{stage}] {body['text']}", flush=True)
        elif type_ == "metric":
            metrics.append(body)
        elif type_ == "artifact":
            artifacts.append(body)

    return emit, metrics, artifacts


def _missing_extras(plan: Plan, workdir: Path, plugin_timeout: float) -> dict[str, list[str]]:
    """Per stage, the optional features its params need that this machine lacks (a package such as chgnet,
    a scorer no plugin registers). Plugins are listed, in a subprocess, only when some stage needs one."""
    from infra.node import facts

    needs = {}
    for s in plan.stages:
        kind = get_stage_kind(s.kind)
        if kind.extras is not None:
            needs[s.name] = kind.extras(kind.params.model_validate(s.params))
    have = set(facts.extras())
    if any(extra.partition(":")[0] in facts.PLUGIN_KINDS for extra in set().union(*needs.values())):
        listed, warnings = facts.PluginListing.start(workdir, plugin_timeout).result()
        have.update(listed)
        for warning in warnings:
            print(f"infra-train: {warning}", file=sys.stderr)
    return {name: sorted(need - have) for name, need in needs.items() if need - have}


def run_plan(
    plan: Plan,
    workdir: Path,
    experiment: str,
    gpus_available: int,
    opts: LocalOptions = LocalOptions(),
) -> list[dict[str, Any]]:
    """Run every stage in dependency order (``opts``: quiet, plugin_timeout); returns one summary per stage."""
    quiet, plugin_timeout = opts.quiet, opts.plugin_timeout
    from infra.node.runner import StageRun, stage_context, start_record

    exp_dir = experiment_dir(workdir, experiment)
    start_record(exp_dir, with_defaults(plan.to_dict()))
    lacking = _missing_extras(plan, workdir, plugin_timeout)
    done: dict[str, str] = {}
    summary = []
    current: list[StageRun] = []
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(*_: object) -> None:
        for run in current:
            run.cancel()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        for stage in plan.order():
            blocked = [d for d in stage.after if done.get(d) != "succeeded"]
            if blocked:
                done[stage.name] = "skipped"
                summary.append({"stage": stage.name, "state": "skipped", "reason": f"{blocked[0]!r} did not succeed"})
                continue
            if stage.resources.gpus > gpus_available or stage.name in lacking or stage.resources.nodes > 1:
                done[stage.name] = "failed"
                if stage.resources.nodes > 1:
                    reason = f"runs on {stage.resources.nodes} nodes (resources.nodes): submit it to a cluster"
                elif stage.name in lacking:
                    reason = (
                        f"needs {', '.join(lacking[stage.name])}, which this machine lacks (crystallm plugins list)"
                    )
                else:
                    reason = f"needs {stage.resources.gpus} GPU(s), this machine has {gpus_available}"
                summary.append({"stage": stage.name, "state": "failed", "reason": reason})
                continue
            kind = get_stage_kind(stage.kind)
            params = kind.params.model_validate(stage.params)
            started = time.time()
            used: dict[str, int] = {}  # retries spent per failure class, as the master counts them
            attempt = 0
            while True:
                attempt += 1
                ctx = stage_context(exp_dir, stage.name, plan.smoke, attempt, world_size(stage.resources))
                emit, metrics, artifacts = _printer(stage.name, quiet)
                gpus = list(range(stage.resources.gpus))
                run = StageRun(kind.build(params, ctx), exp_dir, stage.name, workdir, gpus, emit, attempt)
                current[:] = [run]
                result = run.run()
                if result.state != "failed":
                    break
                cls = failure_class(result)
                used[cls] = used.get(cls, 0) + 1
                if cls not in LOCAL_CLASSES or used[cls] > stage.retries.get(cls, 0):
                    break
            done[stage.name] = result.state
            summary.append(
                {
                    "stage": stage.name,
                    "state": result.state,
                    "reason": result.message,
                    "attempts": attempt,
                    "seconds": round(time.time() - started, 1),
                    "metrics": metrics[-1:],
                    "artifacts": artifacts,
                }
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    return summary


# The failure classes a local run can see: the stage's own error, and the platform failing to run it (the
# runner's launch failure, a full disk). A machine that is lost or preempted is this one: nothing to retry on.
LOCAL_CLASSES = ("error", "infra")
_CLASS_NUMBERS = {1: "node_lost", 2: "preempted", 3: "cancelled", 4: "error", 5: "infra"}  # protos FailureClass


def failure_class(result: Any) -> str:
    """The class of a failed run: the runner's ``failure_class`` (a FailureClass number or name) if it says
    one, else ``error``, as the master reads a node's FAILED without a class."""
    value = getattr(result, "failure_class", None)
    if isinstance(value, int):
        return _CLASS_NUMBERS.get(value, "error")
    if isinstance(value, str) and value:
        name = value.lower().removeprefix("failure_")
        return name if name in _CLASS_NUMBERS.values() else "error"
    return "error"


def build_parser() -> argparse.ArgumentParser:
    d = LocalOptions()
    parser = argparse.ArgumentParser(prog="infra-train", description="Run a plan locally, without a master.")
    parser.add_argument("plan", help="plan JSON file")
    parser.add_argument(
        "--workdir",
        default=d.workdir,
        help=f"workdir (default: the one set with infra-wkdir, else ./{FALLBACK_WORKDIR})",
    )
    parser.add_argument(
        "--experiment", default=d.experiment, help="experiment directory name (default: <plan name>-<date>-<time>)"
    )
    parser.add_argument("--quiet", action="store_true", default=d.quiet, help="do not echo the stages' output")
    parser.add_argument(
        "--plugin-timeout",
        type=float,
        default=d.plugin_timeout,
        help=f"seconds a plugin may take to import (default {d.plugin_timeout:g})",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=d.smoke,
        help='run in smoke mode, as "smoke": true in the plan does: every stage on the CPU with tiny limits',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = LocalOptions(args.workdir, args.experiment, args.quiet, args.plugin_timeout, args.smoke)
    try:
        workdir = prepare_workdir(opts.workdir or get_workdir() or FALLBACK_WORKDIR)
        problems: list[str] = []
        load_stage_modules(timeout=opts.plugin_timeout, problems=problems, files=workdir_stage_plugins(workdir))
        for problem in problems:
            print(f"infra-train: {problem}; running without it", file=sys.stderr)
        data = load_plan_data(args.plan)
        plan = validate_plan(resolve_inputs(force_smoke(data) if opts.smoke else data, Path.cwd()))
    except PlanError as e:
        print(f"infra-train: {args.plan}: plan rejected:", file=sys.stderr)
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    except WorkdirError as e:
        print(f"infra-train: {e}", file=sys.stderr)
        return 2
    from infra.node.facts import probe_gpus

    experiment = opts.experiment or f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"infra-train: {experiment} in {experiment_dir(workdir, experiment)}", flush=True)
    summary = run_plan(plan, workdir, experiment, len(probe_gpus().gpus), opts)
    for s in summary:
        print(f"  {s['stage']:<16} {s['state']:<10} {s.get('reason', '')}")
    return 0 if all(s["state"] == "succeeded" for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
