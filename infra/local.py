"""``infra-train PLAN.json``: run a plan on this machine without a master.

Same validation and the same stage runner as the node agent; stages run one at a time in dependency
order in ``<workdir>/experiments/<experiment>/``. The workdir is ``--workdir``, else the one set with
``infra-wkdir``, else ``./infra-work``. A failed stage (after its retries) stops the run; the stages
that depend on it are skipped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from infra.plan import Plan, PlanError, load_plan_data, resolve_inputs, validate_plan
from infra.stages import StageContext, get_stage_kind, load_stage_modules
from infra.wkdir import WorkdirError, get_workdir, prepare_workdir


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


def run_plan(
    plan: Plan,
    workdir: Path,
    experiment: str,
    gpus_available: int,
    quiet: bool = False,
) -> list[dict[str, Any]]:
    """Run every stage in dependency order; returns one summary per stage."""
    from node.runner import StageRun

    exp_dir = workdir / "experiments" / experiment
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
            if stage.resources.gpus > gpus_available:
                done[stage.name] = "failed"
                reason = f"needs {stage.resources.gpus} GPU(s), this machine has {gpus_available}"
                summary.append({"stage": stage.name, "state": "failed", "reason": reason})
                continue
            kind = get_stage_kind(stage.kind)
            params = kind.params.model_validate(stage.params)
            started = time.time()
            for attempt in range(1, stage.max_retries + 2):
                ctx = StageContext(exp_dir, exp_dir / stage.name, plan.smoke, attempt)
                emit, metrics, artifacts = _printer(stage.name, quiet)
                run = StageRun(
                    kind.build(params, ctx), ctx.stage_dir, workdir, list(range(stage.resources.gpus)), emit, attempt
                )
                current[:] = [run]
                result = run.run()
                if result.state == "succeeded":
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra-train", description="Run a plan locally, without a master.")
    parser.add_argument("plan", help="plan JSON file")
    parser.add_argument("--workdir", help="workdir (default: the one set with infra-wkdir, else ./infra-work)")
    parser.add_argument("--experiment", help="experiment directory name (default: <plan name>-<date>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the stages' output")
    args = parser.parse_args(argv)
    load_stage_modules()
    try:
        plan = validate_plan(resolve_inputs(load_plan_data(args.plan), Path.cwd()))
        workdir = prepare_workdir(args.workdir or get_workdir() or "infra-work")
    except PlanError as e:
        print(f"infra-train: {args.plan}: plan rejected:", file=sys.stderr)
        for issue in e.issues:
            print(f"  {issue}", file=sys.stderr)
        return 2
    except WorkdirError as e:
        print(f"infra-train: {e}", file=sys.stderr)
        return 2
    from node.facts import probe_gpus

    experiment = args.experiment or f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"infra-train: {experiment} in {workdir / 'experiments' / experiment}", flush=True)
    summary = run_plan(plan, workdir, experiment, len(probe_gpus().gpus), args.quiet)
    for s in summary:
        print(f"  {s['stage']:<16} {s['state']:<10} {s.get('reason', '')}")
    return 0 if all(s["state"] == "succeeded" for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
