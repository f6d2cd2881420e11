"""The stage runner: the experiment layout, environment, log capture, metrics tailing, artifact paths, cancel,
retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from infra.node.runner import (
    BOOT_ID,
    CANCEL_READ,
    DRAIN_BYTES,
    MAX_CHUNK,
    READ_SIZE,
    StageRun,
    Tail,
    artifact_path,
    process_ident,
    process_start,
    same_process,
    stage_context,
)
from infra.spec.stages import Command, TrainParams, get_stage_kind

from .conftest import alive

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
    while any(alive(p) for p in pids) and time.monotonic() < gone_by:
        time.sleep(0.02)
    assert not any(alive(p) for p in pids)
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
    first = kind.build(params, stage_context(exp, "train", attempt=1))
    assert "--resume" not in first.steps[0] and first.fresh_dir and first.outputs == ["ckpts", "probes"]
    settings = json.loads(first.files["train.json"])
    assert settings["out_dir"] == str(exp) and settings["data_dir"] == str(exp / "data")  # out_dir: the record
    assert settings["probes"] == [{"name": "p"}] and first.steps[0][-1] == str(exp / "work" / "train" / "train.json")
    retry = kind.build(params, stage_context(exp, "train", attempt=2))
    assert "--resume" not in retry.steps[0] and retry.fresh_dir  # no checkpoint: start over, clean
    (exp / "ckpts").mkdir(parents=True)
    (exp / "ckpts" / "last.pt").write_bytes(b"x")
    retry = kind.build(params, stage_context(exp, "train", attempt=2))
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
    assert alive(record["pid"])

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


def test_the_output_reader_is_linear_and_holds_a_bounded_buffer(tmp_path: Path) -> None:
    # issue 14, item 4: the reader re-sliced its whole remaining buffer once per line (60 k lines: 11 s) and
    # read a file to its end in one go (a 210 MB flood sat in memory). Now each call reads at most READ_SIZE
    # and keeps less than one line; the whole file is scanned once.
    path = tmp_path / "out"
    n = 200_000
    path.write_bytes(b"".join((b"line %d " % i).ljust(69, b".") + b"\n" for i in range(n)))
    tail = Tail(path, 0)
    got, biggest, cpu = 0, 0, time.thread_time()
    while batch := tail.lines():
        biggest = max(biggest, tail.buffered + sum(len(line) + 1 for line, _ in batch))
        assert tail.buffered < MAX_CHUNK
        for line, offset in batch:
            assert line == (b"line %d " % got).ljust(69, b".") and offset == (got + 1) * 70
            got += 1
    assert got == n and tail.offset == path.stat().st_size and not tail.more
    assert biggest <= READ_SIZE + MAX_CHUNK
    # counted in this thread's CPU time (not wall time, so a loaded machine does not matter): the linear
    # reader needs well under a second; the quadratic one needed about 30 s for these 14 MB
    assert time.thread_time() - cpu < 10
    # a "line" without a newline is cut at max_chunk; at the end (final) the rest is taken as it is
    path.write_bytes(b"x" * 25 + b"\nabc")
    tail = Tail(path, 0, max_chunk=10)
    assert [line for line, _ in tail.lines()] == [b"x" * 10, b"x" * 10, b"x" * 5]
    assert tail.lines(final=True) == [(b"abc", 29)]


FLOOD = """
import sys
line = "{}\\n"
out = sys.stdout
for i in range({}):
    out.write(str(i) + line)
out.flush()
"""


def test_a_cancel_during_a_flood_of_output_stops_reading_and_ends_cancelled(tmp_path: Path) -> None:
    # issue 14, items 4 and 5: the step printed as fast as it could and exited 0 while the agent was still
    # reading; a cancel then had no effect (the reader read on) and the attempt could end "succeeded".
    n = 500_000  # ~35 MB
    cmd = Command([[PY, "-c", FLOOD.format("." * 64, n)], [PY, "-c", "print('never')"]])
    exp = tmp_path / "w" / "experiments" / "e"
    out = exp / "work" / "s" / ".infra" / "attempt-1" / "step-1.out"
    seen: list[str] = []
    at_cancel: list[int] = []

    def emit(t: str, b: dict[str, Any]) -> None:
        seen.append(b.get("text", "")) if t == "log" else None
        if not at_cancel and len(seen) > 5 and (exp / "work" / "s" / ".infra" / "attempt-1" / "exit-1").exists():
            at_cancel.append(len(seen))  # the step has ended (exit 0); the agent is still reading its output
            run.cancel()

    run = StageRun(cmd, exp, "s", tmp_path / "w", [], emit)
    result = run.run()
    assert at_cancel, "the step ended before any output was read"
    assert result.state == "cancelled" and result.failure == "cancelled" and result.exit_code == 0
    assert "never" not in seen
    after = len(seen) - at_cancel[0]
    assert after <= (DRAIN_BYTES + 2 * CANCEL_READ) // 66 + 10  # read on for a bounded amount only
    stdout = [x for x in seen if not x.startswith(("$ ", "adopted"))]
    assert stdout[: len(stdout) - 1] == [f"{i}{'.' * 64}" for i in range(len(stdout) - 1)]  # in order, once
    assert seen[-1].endswith("bytes of the step's output not read: the attempt was told to stop")
    assert int(seen[-1].split()[0]) > 0 and out.stat().st_size == n * 65 + sum(len(str(i)) for i in range(n))


def test_a_cancelled_step_that_exits_0_or_escapes_its_group_is_cancelled_and_killed(tmp_path: Path) -> None:
    # a step that traps SIGTERM and exits 0, with a child in a session of its own (outside the group)
    script = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)"], start_new_session=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open("pids", "w").write(f"{child.pid}")
time.sleep(100)
"""
    stage = tmp_path / "w" / "experiments" / "e" / "work" / "s"
    run = StageRun(Command([[PY, "-c", script]]), stage.parent.parent, "s", tmp_path / "w", [], lambda t, b: None)
    holder: list = []
    thread = threading.Thread(target=lambda: holder.append(run.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while not (stage / "pids").exists() or not (stage / "pids").read_text():
        assert time.monotonic() < deadline, "the stage did not start"
        time.sleep(0.05)
    child = int((stage / "pids").read_text())
    time.sleep(0.2)
    run.cancel()
    thread.join(10)
    assert holder[0].state == "cancelled" and holder[0].exit_code == 0 and holder[0].failure == "cancelled"
    gone_by = time.monotonic() + 5
    while alive(child) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not alive(child)


def test_failure_classes(tmp_path: Path) -> None:
    fails = _run(Command([[PY, "-c", "import sys; sys.exit(3)"]]), tmp_path / "a")[0]
    assert (fails.state, fails.exit_code, fails.failure) == ("failed", 3, "error")
    missing = _run(Command([["/nonexistent/command"]]), tmp_path / "b")[0]
    assert (missing.state, missing.exit_code, missing.failure) == ("failed", 127, "infra")
    shell_127 = _run(Command([[PY, "-c", "import sys; sys.exit(127)"]]), tmp_path / "c")[0]
    assert shell_127.failure == "error"  # the stage's own 127 is its own
    (tmp_path / "d" / "work" / "experiments" / "e" / "work").mkdir(parents=True)
    (tmp_path / "d" / "work" / "experiments" / "e" / "work" / "s").write_text("a file where the dir goes")
    no_dir = _run(Command([[PY, "-c", "1"]]), tmp_path / "d")[0]
    assert no_dir.state == "failed" and no_dir.failure == "infra" and "cannot prepare" in no_dir.message
    # the node stops it (graceful agent stop): failed, preempted
    exp = tmp_path / "e" / "w" / "experiments" / "e"
    run = StageRun(Command([[PY, "-c", "import time; time.sleep(60)"]]), exp, "s", tmp_path / "e" / "w", [], print)
    threading.Timer(1.0, run.stop, ("the node agent was stopped", "preempted")).start()
    stopped = run.run()
    assert (stopped.state, stopped.failure, stopped.message) == ("failed", "preempted", "the node agent was stopped")
    # a cancel wins over the node's own reason
    run = StageRun(Command([[PY, "-c", "1"]]), exp, "t", tmp_path / "e" / "w", [], print)
    run.stop("stopping", "preempted")
    run.cancel()
    assert run.run().failure == "cancelled"


def test_an_adopted_step_gone_without_an_exit_status_is_node_lost(tmp_path: Path) -> None:
    cmd = Command([[PY, "-c", "import time; time.sleep(60)"]])
    exp = tmp_path / "w" / "experiments" / "e"
    first = StageRun(cmd, exp, "s", tmp_path / "w", [], lambda t, b: None)
    holder: list = []
    thread = threading.Thread(target=lambda: holder.append(first.run()))
    thread.start()
    record = exp / "work" / "s" / ".infra" / "attempt-1" / "run.json"
    deadline = time.monotonic() + 30
    while not record.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    position = dict(first.position)
    pid = json.loads(record.read_text())["pid"]
    os.killpg(pid, 9)  # the machine "restarted": launcher and step gone, no exit status written
    thread.join(10)
    again = StageRun(cmd, exp, "s", tmp_path / "w", [], lambda t, b: None, resume_from=position)
    lost = again.run()
    assert (lost.state, lost.failure) == ("failed", "node_lost") and "left no exit status" not in lost.message


def test_a_step_is_recognised_after_a_clock_step(tmp_path: Path) -> None:
    # the wall-clock start time (psutil: boot time read from the clock now + ticks) moves when the clock is
    # stepped; a step must still be recognised (to be cancelled, adopted), and a reused pid must not be
    proc = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        started, ident = process_start(proc.pid), process_ident(proc.pid)
        assert started is not None and ident is not None and ident.startswith(BOOT_ID)
        assert same_process(proc.pid, started + 5.0, ident)  # as after a 5 s clock step
        assert not same_process(proc.pid, started, ident.rsplit(":", 1)[0] + ":1")  # another process, that pid
        assert same_process(proc.pid, started) and not same_process(proc.pid, started + 5.0)  # old records
    finally:
        proc.kill()
        proc.wait()
    assert not same_process(proc.pid, started, ident) and process_ident(proc.pid) is None


def test_a_step_launched_by_an_agent_that_died_before_recording_it_is_adopted_not_started_again(
    tmp_path: Path,
) -> None:
    # the agent spooled "$ argv" (position step 1), started the launcher, and died before writing run.json
    script = "import time; open('starts', 'a').write('x'); time.sleep(1.5); print('done')"
    cmd = Command([[PY, "-c", script]])
    exp = tmp_path / "w" / "experiments" / "e"
    first = StageRun(cmd, exp, "s", tmp_path / "w", [], lambda t, b: None)
    first._prepare_dir()
    first.records.mkdir(parents=True)
    exit_file = first.records / "exit-1"
    launcher = first._launch(cmd.steps[0], first.records / "step-1.out", first.records / "step-1.err", exit_file)
    deadline = time.monotonic() + 30
    while not (exit_file.parent / "exit-1.started").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    events: list = []
    position = {"step": 1, "out": 0, "err": 0, "events": 0, "log": 0}
    again = StageRun(cmd, exp, "s", tmp_path / "w", [], lambda t, b: events.append((t, b)), resume_from=position)
    assert again.run().state == "succeeded"
    launcher.wait(10)
    assert (exp / "work" / "s" / "starts").read_text() == "x"  # started once
    assert _logs(events, "stdout") == ["done"]
    assert any(t.startswith("adopted step 1") for t in _logs(events, "agent"))
