"""A test-only stage kind, ``probe``, loaded by nodes through ``INFRA_STAGE_MODULES=<this file>``.

A probe stage prints its ``CUDA_VISIBLE_DEVICES``, emits metrics and artifacts through the real
events.jsonl sink, spawns a small process tree (to check that cancel ends all of it), records every
pid in ``pids.txt``, sleeps, and exits with ``exit_code``.
"""

from __future__ import annotations

import json
import sys

from pydantic import Field

from infra.stages import Command, Resources, Spec, StageContext, StageKind, register_stage

SCRIPT = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from crystallm_core.events import open_sink

p = json.loads(sys.argv[1])
stage = Path.cwd()
print("CUDA_VISIBLE_DEVICES=" + repr(os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
print("probe on stderr", file=sys.stderr, flush=True)
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(p["children"])]
(stage / "pids.txt").write_text("\n".join(str(x) for x in [os.getpid()] + [c.pid for c in children]) + "\n")
(stage / "out.txt").write_text("probe output\n")
with open_sink(stage) as sink:
    for step in range(p["metrics"]):
        sink.metric(step, loss=1.0 / (step + 1), lr=0.1)
    sink.artifact(stage / "out.txt", "report")
    sink.artifact("../../../../../../etc/passwd", "report")
    sink.progress("probe", 1, 1)
time.sleep(p["seconds"])
sys.exit(p["exit_code"])
"""


class ProbeParams(Spec):
    seconds: float = Field(0.0, ge=0)
    children: int = Field(0, ge=0)
    metrics: int = Field(3, ge=0)
    exit_code: int = 0


def build(p: ProbeParams, ctx: StageContext) -> Command:
    return Command([[sys.executable, "-c", SCRIPT, json.dumps(p.model_dump())]])


register_stage("probe", StageKind(ProbeParams, build, Resources(0, 1, 512), description="test probe"))
