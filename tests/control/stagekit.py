"""Test-only stage kinds, loaded by nodes through ``INFRA_STAGE_MODULES=<this file>``.

``probe`` prints its ``CUDA_VISIBLE_DEVICES``, emits metrics and artifacts through the real events sink
(``$CRYSTALLM_EVENTS``), spawns a small process tree (to check that cancel ends all of it), records every pid
in ``pids.txt`` (in its working directory, ``work/<stage>/``), writes ``out.txt`` into
``artifacts/<stage>/``, sleeps, and exits with ``exit_code``.

``stream`` writes a known sequence, paced, after ``delay`` seconds (and, with ``gate``, once that file exists):
``lines`` stdout lines ``line <i>`` (``width`` characters), a metric every ``metric_every`` lines, one artifact
at the end; the fault tests compare what the master stored with exactly this. ``fill`` writes ``mib`` MiB into
its working directory, then sleeps.
"""

from __future__ import annotations

import json
import sys

from pydantic import Field

from infra.spec.stages import Command, Resources, Spec, StageContext, StageKind, register_stage

SCRIPT = r"""
import json, os, subprocess, sys, time
from pathlib import Path
from crystallm_core.events import open_sink

p = json.loads(sys.argv[1])
stage, out = Path.cwd(), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
print("CUDA_VISIBLE_DEVICES=" + repr(os.environ.get("CUDA_VISIBLE_DEVICES")), flush=True)
print("probe on stderr", file=sys.stderr, flush=True)
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(p["children"])]
(stage / "pids.txt").write_text("\n".join(str(x) for x in [os.getpid()] + [c.pid for c in children]) + "\n")
(out / "out.txt").write_text("probe output\n")
with open_sink(stage) as sink:
    for step in range(p["metrics"]):
        sink.metric(step, loss=1.0 / (step + 1), lr=0.1)
    sink.artifact(out / "out.txt", "report")
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
    argv = [sys.executable, "-c", SCRIPT, json.dumps(p.model_dump()), str(ctx.artifacts_dir)]
    return Command([argv], outputs=[ctx.rel(ctx.artifacts_dir)])


register_stage("probe", StageKind(ProbeParams, build, Resources(0, 1, 512), description="test probe"))


STREAM = r"""
import json, os, sys, time
from pathlib import Path
from crystallm_core.events import open_sink

p = json.loads(sys.argv[1])
stage, out = Path.cwd(), Path(sys.argv[2])
(stage / "pids.txt").write_text(f"{os.getpid()}\n")
time.sleep(p["delay"])
waited = 0.0
while p["gate"] and not Path(p["gate"]).exists() and waited < 120:
    time.sleep(0.1)
    waited += 0.1
with open_sink(stage) as sink:
    for i in range(p["lines"]):
        print(f"line {i} ".ljust(p["width"], "."), flush=True)
        if i % p["metric_every"] == 0:
            sink.metric(i, value=float(i))
        if p["interval"]:
            time.sleep(p["interval"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "out.txt").write_text("done\n")
    sink.artifact(out / "out.txt", "report")
sys.exit(p["exit_code"])
"""


class StreamParams(Spec):
    lines: int = Field(100, ge=0)
    width: int = Field(12, ge=1)
    metric_every: int = Field(10, ge=1)
    interval: float = Field(0.0, ge=0)
    delay: float = Field(0.0, ge=0)
    gate: str = ""  # a file: the lines start once it exists (at most 120 s later), so a test says when
    exit_code: int = 0


def build_stream(p: StreamParams, ctx: StageContext) -> Command:
    argv = [sys.executable, "-c", STREAM, json.dumps(p.model_dump()), str(ctx.artifacts_dir)]
    return Command([argv], outputs=[ctx.rel(ctx.artifacts_dir)])


FILL = r"""
import os, sys, time
mib = int(sys.argv[1])
with open("fill.bin", "wb") as fh:
    for _ in range(mib):
        fh.write(os.urandom(1 << 20))
        fh.flush()
        time.sleep(0.02)
print("filled", flush=True)
time.sleep(60)
"""


class FillParams(Spec):
    mib: int = Field(1, ge=1)


def build_fill(p: FillParams, ctx: StageContext) -> Command:
    return Command([[sys.executable, "-c", FILL, str(p.mib)]])


register_stage("stream", StageKind(StreamParams, build_stream, Resources(0, 1, 256), description="test stream"))
register_stage("fill", StageKind(FillParams, build_fill, Resources(0, 1, 256), description="test disk filler"))
