"""The stage runner: environment, log capture, events.jsonl tailing, artifact paths, cancel, retries."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from infra.stages import Command, StageContext, TrainParams, get_stage_kind
from node.runner import StageRun, workdir_relative

PY = sys.executable


def _run(cmd: Command, tmp: Path, gpus: list[int] | None = None, attempt: int = 1) -> tuple[Any, list]:
    events: list[tuple[str, dict[str, Any]]] = []
    run = StageRun(
        cmd,
        tmp / "work" / "experiments" / "e" / "s",
        tmp / "work",
        gpus or [],
        lambda t, b: events.append((t, b)),
        attempt,
    )
    return run.run(), events


def _logs(events: list, stream: str) -> list[str]:
    return [b["text"] for t, b in events if t == "log" and b["stream"] == stream]


def test_environment_logs_and_steps(tmp_path: Path) -> None:
    show = "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['CRYSTALLM_EVENTS'], os.getcwd())"
    cmd = Command(
        [[PY, "-c", show], [PY, "-c", "import sys; print('x' * 20000); sys.exit(3)"], [PY, "-c", "1"]],
        files={"cfg/a.json": "{}"},
    )
    result, events = _run(cmd, tmp_path, [2, 5])
    stage = tmp_path / "work" / "experiments" / "e" / "s"
    out = _logs(events, "stdout")
    assert out[0] == f"'2,5' {stage / 'events.jsonl'} {stage}"
    assert out[1].endswith("[11808 characters cut]")
    assert result.state == "failed" and result.exit_code == 3 and result.message.startswith("step 2/3")
    assert (stage / "cfg" / "a.json").read_text() == "{}"
    assert len([t for t in _logs(events, "agent") if t.startswith("$ ")]) == 2  # the third step never ran


def test_no_gpu_means_empty_cuda_visible_devices(tmp_path: Path) -> None:
    result, events = _run(Command([[PY, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"]]), tmp_path)
    assert result.state == "succeeded" and _logs(events, "stdout") == ["''"]


def test_events_file_is_tailed_and_artifacts_are_confined(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("x")
    script = f"""
import os
from pathlib import Path
from crystallm_core.events import open_sink
os.symlink({str(outside)!r}, "link")
Path("ok.txt").write_text("ok")
with open_sink(".") as s:
    s.metric(7, loss=float("nan"), acc=0.5)
    s.artifact("ok.txt", "report")
    s.artifact("link", "report")
    s.artifact("../../../../x", "report")
    s.artifact({str(outside)!r}, "report")
    s.progress("p", 2, None)
"""
    result, events = _run(Command([[PY, "-c", script]]), tmp_path)
    assert result.state == "succeeded"
    typed = [(t, b) for t, b in events if t != "log"]
    assert typed == [
        ("metric", {"step": 7, "values": {"loss": None, "acc": 0.5}}),
        ("artifact", {"path": "experiments/e/s/ok.txt", "kind": "report"}),
        ("progress", {"what": "p", "done": 2, "total": None}),
    ]
    assert len([t for t in _logs(events, "agent") if t.startswith("artifact rejected")]) == 3


def test_workdir_relative(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "e" / "s").mkdir(parents=True)
    assert workdir_relative("a/../b.pt", work / "e" / "s", work) == "e/s/b.pt"
    assert workdir_relative(str(work / "e" / "x"), work / "e" / "s", work) == "e/x"
    for bad in ("../../../etc/passwd", "/etc/passwd"):
        with pytest.raises(ValueError, match="outside the workdir"):
            workdir_relative(bad, work / "e" / "s", work)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


def test_cancel_ends_the_whole_process_group(tmp_path: Path) -> None:
    # the child ignores SIGTERM: only the SIGKILL after the grace period ends it
    script = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(100)"])
open("pids", "w").write(f"{os.getpid()} {child.pid}")
time.sleep(100)
"""
    events: list = []
    stage = tmp_path / "w" / "s"
    run = StageRun(
        Command([[PY, "-c", script], [PY, "-c", "print('never')"]]),
        stage,
        tmp_path / "w",
        [],
        lambda t, b: events.append((t, b)),
    )
    holder: list = []
    thread = threading.Thread(target=lambda: holder.append(run.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while not (stage / "pids").exists() or len((stage / "pids").read_text().split()) < 2:
        assert time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # let the child install its SIGTERM handler
    pids = [int(p) for p in (stage / "pids").read_text().split()]
    started = time.monotonic()
    run.cancel()
    thread.join(10)
    assert time.monotonic() - started < 5
    assert holder[0].state == "cancelled"
    assert not any(_alive(p) for p in pids)
    assert "never" not in _logs(events, "stdout")


def test_a_retry_starts_clean_unless_the_kind_resumes(tmp_path: Path) -> None:
    stage = tmp_path / "work" / "experiments" / "e" / "s"
    stage.mkdir(parents=True)
    (stage / "old").write_text("1")
    touch = [PY, "-c", "open('new', 'w').write('2')"]
    assert _run(Command([touch]), tmp_path, attempt=2)[0].state == "succeeded"
    assert sorted(p.name for p in stage.iterdir()) == [".infra", "new"]  # .infra: the runner's own records
    assert (stage.parent / "s.attempt-1" / "old").exists()
    assert _run(Command([touch], fresh_dir=False), tmp_path, attempt=3)[0].state == "succeeded"
    assert not (stage.parent / "s.attempt-2").exists() and (stage / "new").exists()


def test_a_retried_train_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    kind = get_stage_kind("train")
    params = TrainParams(data_dir="prepare/data", model="tiny", max_steps=10)
    stage = tmp_path / "e" / "train"
    first = kind.build(params, StageContext(tmp_path / "e", stage, attempt=1))
    assert "--resume" not in first.steps[0] and first.fresh_dir
    retry = kind.build(params, StageContext(tmp_path / "e", stage, attempt=2))
    assert "--resume" not in retry.steps[0] and retry.fresh_dir  # no checkpoint: start over, clean
    (stage / "model" / "ckpts").mkdir(parents=True)
    (stage / "model" / "ckpts" / "last.pt").write_bytes(b"x")
    retry = kind.build(params, StageContext(tmp_path / "e", stage, attempt=2))
    assert retry.steps[0][-1] == "--resume" and not retry.fresh_dir  # in place, from ckpts/last.pt
    assert json.loads(retry.files["train.json"])["out_dir"] == str(stage / "model")


def test_a_restarted_agent_adopts_the_step_and_reads_on_exactly_where_it_stopped(tmp_path: Path) -> None:
    script = """
import sys, time
from crystallm_core.events import open_sink
with open_sink(".") as sink:
    for i in range(40):
        print(f"out {i}", flush=True)
        print(f"err {i}", file=sys.stderr, flush=True)
        sink.metric(i, v=float(i))
        time.sleep(0.02)
"""
    cmd = Command([[PY, "-c", script], [PY, "-c", "print('second step')"]])
    stage = tmp_path / "w" / "experiments" / "e" / "s"
    seen: list[tuple[str, dict[str, Any], dict[str, int]]] = []

    class AgentDied(Exception):
        pass

    def dying(t: str, b: dict[str, Any]) -> None:
        seen.append((t, b, dict(first.position)))
        if len(seen) == 25:
            raise AgentDied  # the agent process dies here; the step does not

    first = StageRun(cmd, stage, tmp_path / "w", [], dying)
    with pytest.raises(AgentDied):
        first.run()
    record = json.loads((stage / ".infra" / "attempt-1" / "run.json").read_text())
    assert _alive(record["pid"])

    rest: list[tuple[str, dict[str, Any]]] = []
    again = StageRun(cmd, stage, tmp_path / "w", [], lambda t, b: rest.append((t, b)), resume_from=seen[-1][2])
    assert again.run().state == "succeeded"
    events = [(t, b) for t, b, _ in seen] + [x for x in rest if not x[1].get("text", "").startswith("adopted")]
    texts = [b["text"] for t, b in events if t == "log" and b["stream"] != "agent"]
    assert sorted(texts) == sorted([f"out {i}" for i in range(40)] + [f"err {i}" for i in range(40)] + ["second step"])
    assert [b["step"] for t, b in events if t == "metric"] == list(range(40))
    assert [b["text"] for t, b in events if t == "log" and b["stream"] == "agent"][0].startswith("$ ")
    assert len([1 for t, b in events if t == "log" and b.get("text", "").startswith("$ ")]) == 2
