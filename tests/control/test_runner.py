"""The stage runner: the experiment layout, environment, log capture, metrics tailing, artifact paths, cancel,
retries."""

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
from node.runner import StageRun, artifact_path

PY = sys.executable


def _run(cmd: Command, tmp: Path, gpus: list[int] | None = None, attempt: int = 1) -> tuple[Any, list]:
    events: list[tuple[str, dict[str, Any]]] = []
    run = StageRun(
        cmd,
        tmp / "work" / "experiments" / "e",
        "s",
        tmp / "work",
        gpus or [],
        lambda t, b: events.append((t, b)),
        attempt,
    )
    return run.run(), events


def _logs(events: list, stream: str) -> list[str]:
    return [b["text"] for t, b in events if t == "log" and b["stream"] == stream]


def test_environment_logs_and_steps(tmp_path: Path) -> None:
    show = (
        "import os; e = os.environ; "
        "print(repr(e['CUDA_VISIBLE_DEVICES']), e['CRYSTALLM_EVENTS'], os.getcwd(), e['INFRA_WKDIR'])"
    )
    cmd = Command(
        [[PY, "-c", show], [PY, "-c", "import sys; print('x' * 20000); sys.exit(3)"], [PY, "-c", "1"]],
        files={"cfg/a.json": "{}"},
    )
    result, events = _run(cmd, tmp_path, [2, 5])
    exp = tmp_path / "work" / "experiments" / "e"
    out = _logs(events, "stdout")
    assert out[0] == f"'2,5' {exp / 'metrics' / 's.jsonl'} {exp / 'work' / 's'} {tmp_path / 'work'}"
    assert out[1].endswith("[11808 characters cut]")
    assert result.state == "failed" and result.exit_code == 3 and result.message.startswith("step 2/3")
    assert (exp / "work" / "s" / "cfg" / "a.json").read_text() == "{}"
    agent = [t for t in _logs(events, "agent") if t.startswith("$ ")]
    assert len(agent) == 2  # the third step never ran
    # logs/<stage>.log holds what was sent, in the same order; the agent's own lines are marked
    sent = [f"[infra] {b['text']}" if b["stream"] == "agent" else b["text"] for t, b in events if t == "log"]
    assert (exp / "logs" / "s.log").read_text().splitlines() == sent and sent[0] == f"[infra] {agent[0]}"


def test_no_gpu_means_empty_cuda_visible_devices(tmp_path: Path) -> None:
    result, events = _run(Command([[PY, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"]]), tmp_path)
    assert result.state == "succeeded" and _logs(events, "stdout") == ["''"]


def test_metrics_file_is_tailed_and_artifacts_are_confined_to_the_record(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("x")
    script = f"""
import json, os
from pathlib import Path
from crystallm_core.events import open_sink
os.symlink({str(outside)!r}, "link")
Path("scratch.txt").write_text("scratch")
Path("../../artifacts/s").mkdir(parents=True)
Path("../../artifacts/s/ok.txt").write_text("ok")
with open_sink(".") as s:
    s.metric(7, loss=float("nan"), acc=0.5)
    s.artifact("../../artifacts/s/ok.txt", "report")
    s.artifact("link", "report")
    s.artifact("../../../../x", "report")
    s.artifact({str(outside)!r}, "report")
    s.artifact("scratch.txt", "report")
    s.progress("p", 2, None)
with open(os.environ["CRYSTALLM_EVENTS"], "a") as fh:  # a relative path is relative to the metrics folder
    fh.write(json.dumps({{"seq": 9, "time": 0, "type": "artifact", "path": "../ckpts/x.pt", "kind": "checkpoint"}}))
    fh.write("\\n")
"""
    result, events = _run(Command([[PY, "-c", script]]), tmp_path)
    assert result.state == "succeeded"
    typed = [(t, b) for t, b in events if t != "log"]
    assert typed == [
        ("metric", {"step": 7, "values": {"loss": None, "acc": 0.5}}),
        ("artifact", {"path": "experiments/e/artifacts/s/ok.txt", "kind": "report"}),
        ("progress", {"what": "p", "done": 2, "total": None}),
        ("artifact", {"path": "experiments/e/ckpts/x.pt", "kind": "checkpoint"}),
    ]
    rejected = [t for t in _logs(events, "agent") if t.startswith("artifact rejected")]
    assert len(rejected) == 4 and sum("outside the experiment directory" in t for t in rejected) == 3
    assert "scratch folder" in rejected[-1]


def test_artifact_path() -> None:
    work = Path("/w")
    exp, metrics = work / "experiments" / "e", work / "experiments" / "e" / "metrics"
    assert artifact_path("../ckpts/a/../b.pt", metrics, exp, work) == "experiments/e/ckpts/b.pt"
    assert artifact_path(str(exp / "samples" / "s"), metrics, exp, work) == "experiments/e/samples/s"
    for bad in ("../../../../etc/passwd", "/etc/passwd", "../../other/ckpts/x.pt", "/w/nodes/n.json"):
        with pytest.raises(ValueError, match="outside the experiment directory"):
            artifact_path(bad, metrics, exp, work)
    with pytest.raises(ValueError, match="scratch folder"):
        artifact_path("../work/s/tmp.txt", metrics, exp, work)


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
    stage = tmp_path / "w" / "experiments" / "e" / "work" / "s"
    run = StageRun(
        Command([[PY, "-c", script], [PY, "-c", "print('never')"]]),
        tmp_path / "w" / "experiments" / "e",
        "s",
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
    gone_by = time.monotonic() + 2  # SIGKILL has been sent; on a loaded machine the kernel may take a moment
    while any(_alive(p) for p in pids) and time.monotonic() < gone_by:
        time.sleep(0.02)
    assert not any(_alive(p) for p in pids)
    assert "never" not in _logs(events, "stdout")


def test_a_retry_keeps_the_earlier_attempt_aside_unless_the_kind_resumes(tmp_path: Path) -> None:
    exp = tmp_path / "work" / "experiments" / "e"
    for path in ("work/s/old", "logs/s.log", "metrics/s.jsonl", "samples/s/a.cif", "samples/other/b.cif"):
        (exp / path).parent.mkdir(parents=True, exist_ok=True)
        (exp / path).write_text("earlier\n")
    touch = [PY, "-c", "open('new', 'w').write('2'); print('second')"]
    result, events = _run(Command([touch], outputs=["samples/s"]), tmp_path, attempt=2)
    assert result.state == "succeeded"
    assert sorted(p.name for p in (exp / "work" / "s").iterdir()) == [".infra", "new"]  # .infra: the runner's own
    kept = ["work/s.attempt-1/old", "logs/s.attempt-1.log", "metrics/s.attempt-1.jsonl", "samples/s.attempt-1/a.cif"]
    assert all((exp / path).read_text() == "earlier\n" for path in kept)
    assert (exp / "samples" / "other" / "b.cif").exists() and not (exp / "samples" / "s").exists()
    log = (exp / "logs" / "s.log").read_text()
    assert "second" in log and "earlier\n" not in log
    assert any(t.startswith("earlier attempt's files kept as work/s.attempt-1, ") for t in _logs(events, "agent"))
    assert _run(Command([touch], fresh_dir=False), tmp_path, attempt=3)[0].state == "succeeded"
    assert not (exp / "work" / "s.attempt-2").exists() and (exp / "work" / "s" / "new").exists()
    assert (exp / "logs" / "s.log").read_text().splitlines().count("second") == 2  # in place: the log goes on


def test_a_retried_train_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    kind = get_stage_kind("train")
    params = TrainParams(model="tiny", max_steps=10, probes=[{"name": "p"}])
    exp = tmp_path / "e"
    first = kind.build(params, StageContext(exp, "train", attempt=1))
    assert "--resume" not in first.steps[0] and first.fresh_dir and first.outputs == ["ckpts", "probes"]
    settings = json.loads(first.files["train.json"])
    assert settings["out_dir"] == str(exp) and settings["data_dir"] == str(exp / "data")  # out_dir: the record
    assert settings["probes"] == [{"name": "p"}] and first.steps[0][-1] == str(exp / "work" / "train" / "train.json")
    retry = kind.build(params, StageContext(exp, "train", attempt=2))
    assert "--resume" not in retry.steps[0] and retry.fresh_dir  # no checkpoint: start over, clean
    (exp / "ckpts").mkdir(parents=True)
    (exp / "ckpts" / "last.pt").write_bytes(b"x")
    retry = kind.build(params, StageContext(exp, "train", attempt=2))
    assert retry.steps[0][-1] == "--resume" and not retry.fresh_dir  # in place, from ckpts/last.pt


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
    exp = tmp_path / "w" / "experiments" / "e"
    seen: list[tuple[str, dict[str, Any], dict[str, int]]] = []

    class AgentDied(Exception):
        pass

    def dying(t: str, b: dict[str, Any]) -> None:
        seen.append((t, b, dict(first.position)))
        if len(seen) == 25:
            raise AgentDied  # the agent process dies here; the step does not

    first = StageRun(cmd, exp, "s", tmp_path / "w", [], dying)
    with pytest.raises(AgentDied):
        first.run()
    record = json.loads((exp / "work" / "s" / ".infra" / "attempt-1" / "run.json").read_text())
    assert _alive(record["pid"])

    # the spool had recorded 20 of the 25 events when the agent died: the rest are read (and logged) again
    rest: list[tuple[str, dict[str, Any]]] = []
    again = StageRun(cmd, exp, "s", tmp_path / "w", [], lambda t, b: rest.append((t, b)), resume_from=seen[19][2])
    assert again.run().state == "succeeded"
    events = [(t, b) for t, b, _ in seen[:20]] + [x for x in rest if not x[1].get("text", "").startswith("adopted")]
    texts = [b["text"] for t, b in events if t == "log" and b["stream"] != "agent"]
    assert sorted(texts) == sorted([f"out {i}" for i in range(40)] + [f"err {i}" for i in range(40)] + ["second step"])
    logged = [x for x in (exp / "logs" / "s.log").read_text().splitlines() if not x.startswith("[infra] ")]
    assert logged == texts  # the log file too: every line once, in the order sent
    assert [b["step"] for t, b in events if t == "metric"] == list(range(40))
    assert [b["text"] for t, b in events if t == "log" and b["stream"] == "agent"][0].startswith("$ ")
    assert len([1 for t, b in events if t == "log" and b.get("text", "").startswith("$ ")]) == 2
