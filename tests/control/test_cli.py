"""The command lines themselves: help for every option, global options on either side of the verb,
``--version``, ``--log-level``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from crystallm_core import __version__ as core_version
from crystallm_core.cli import VERBS
from crystallm_core.cli import build_parser as crystallm_parser
from crystallm_core.cli import main as crystallm_main
from infra import __version__
from infra.cli import build_parser, globals_after_verb, log_level, main, node_admin_parser
from infra.local import build_parser as infra_train_parser
from infra.master.controller import Controller
from infra.wkdir import build_parser as infra_wkdir_parser

from .conftest import Cluster, wait_for
from .controller_kit import client_api, run_controller


def _parsers() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield "infra", build_parser()
    yield "infra node", node_admin_parser()
    yield "infra-train", infra_train_parser()
    yield "infra-wkdir", infra_wkdir_parser()
    for verb in VERBS:  # a crystallm verb adds its arguments only when it is the one parsed
        yield f"crystallm {verb}", _sub(crystallm_parser(verb), verb)


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return sub.choices[name]


def _undocumented(prog: str, parser: argparse.ArgumentParser) -> Iterator[str]:
    for action in parser._actions:  # noqa: SLF001 (argparse lists its actions nowhere else)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from _undocumented(f"{prog} {name}", sub)
        elif not action.help or action.help == argparse.SUPPRESS:
            yield f"{prog} {'/'.join(action.option_strings) or action.dest}"


def test_every_option_and_argument_has_help() -> None:
    missing = [name for prog, parser in _parsers() for name in _undocumented(prog, parser)]
    assert missing == []


def test_the_walk_sees_options_without_help() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers().add_parser("verb")
    sub.add_argument("--bare")
    sub.add_argument("--told", help="documented")
    assert list(_undocumented("x", parser)) == ["x verb --bare"]


@pytest.mark.parametrize(
    ("argv", "moved"),
    [
        (["--master", "h:1", "status"], ["status", "--master", "h:1"]),
        (["--master=h:1", "--json", "status", "x"], ["status", "x", "--master=h:1", "--json"]),
        (["--tls-ca", "ca.pem", "node", "drain", "n"], ["node", "drain", "n", "--tls-ca", "ca.pem"]),
        (["status", "--master", "h:1"], ["status", "--master", "h:1"]),
        (["--limit", "3", "status"], ["--limit", "3", "status"]),  # a verb's own option stays where it is
    ],
)
def test_global_options_before_the_verb_move_after_it(argv: list[str], moved: list[str]) -> None:
    assert globals_after_verb(argv) == moved


def test_a_global_option_the_verb_does_not_take_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--json", "master"])
    assert exit_.value.code == 2 and "unrecognized arguments: --json" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"infra {__version__}\n"
    with pytest.raises(SystemExit) as exit_:
        crystallm_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"crystallm {core_version}\n"


def _infra(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "infra.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=60, cwd=cluster.tmp)


def test_global_options_and_log_levels_against_a_real_master(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, f"sqlite:///{tmp_path / 'master.db'}")
    try:
        address = cluster.start_master("--log-level", "warning")
        cluster.start_node("n1")

        def online() -> list[str] | None:
            done = _infra(cluster, "--master", address, "--json", "status")
            assert done.returncode == 0, done.stderr
            return [n["name"] for n in json.loads(done.stdout)["nodes"] if n["online"]] or None

        assert wait_for(online, 60, "the node online") == ["n1"]
        listed = _infra(cluster, f"--master={address}", "node", "list", "--json")
        assert listed.returncode == 0 and [n["name"] for n in json.loads(listed.stdout)] == ["n1"], listed.stderr
        # a one-GPU plan submitted with --smoke is placed on this CPU node and runs
        plan = tmp_path / "gpu.json"
        plan.write_text(
            json.dumps({"name": "gpu", "stages": [{"name": "a", "kind": "probe", "resources": {"gpus": 1}}]})
        )
        key = _infra(cluster, "submit", str(plan), "--smoke", "--wait", "--master", address).stdout.split()[0]
        exp = cluster.status(key)["experiments"][0]
        assert exp["state"] == "succeeded" and exp["smoke"] is True and exp["stages"][0]["node"] == "n1"
        # the registration, logged at INFO: by the node (default level), not by the master (--log-level warning)
        assert "INFO infra.node: registered with" in (tmp_path / "n1.log").read_text()
        assert " INFO " not in (tmp_path / "master.log").read_text()
    finally:
        cluster.stop()


def test_the_log_level_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFRA_LOG_LEVEL", raising=False)
    assert log_level(None, "INFO") == "INFO"
    monkeypatch.setenv("INFRA_LOG_LEVEL", "debug")
    assert log_level(None, "INFO") == "DEBUG" and log_level("ERROR", "INFO") == "ERROR"
    monkeypatch.setenv("INFRA_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match=r"\$INFRA_LOG_LEVEL is 'loud'; give one of DEBUG, INFO, WARNING, ERROR"):
        log_level(None, "INFO")


def test_a_bad_log_level_stops_the_command_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INFRA_CONFIG_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main(["master", "--log-level", "loud"])
    assert exit_.value.code == 2 and "--log-level: invalid choice: 'LOUD'" in capsys.readouterr().err
    monkeypatch.setenv("INFRA_LOG_LEVEL", "loud")
    assert main(["node", "--workdir", str(tmp_path / "w")]) == 2
    assert "infra node: $INFRA_LOG_LEVEL is 'loud'" in capsys.readouterr().err


def test_status_shows_whole_shard_names_in_a_narrow_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twelve shards of a long-named stage in 80 columns: each part's name and its merge's name appear whole
    (the other columns wrap), so the parts are told apart by their ends."""
    monkeypatch.setenv("COLUMNS", "80")
    stage = {"name": "structure-search", "kind": "evaluate", "params": {"inputs": ["x"]}}
    plan = {"name": "shards", "stages": [{**stage, "shards": 12}]}

    async def scenario(c: Controller) -> None:
        key = await c.submit(json.dumps(plan))
        async with client_api(c) as address:
            capsys.readouterr()
            assert await asyncio.to_thread(main, ["status", key, "--master", address]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert max(len(line) for line in lines) <= 80
        names = [line.split()[1] for line in lines if line.startswith("│ structure-search")]  # the stage cells
        assert names == [f"structure-search.shard-{i}-of-12" for i in range(12)] + ["structure-search"]

    run_controller(tmp_path, scenario)


def test_artifact_max_bytes_takes_a_size_and_refuses_what_is_not_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from infra.spec.plan import parse_bytes

    assert [parse_bytes(v) for v in ("64GiB", "1.5 MiB", "512kib", "1000")] == [64 << 30, 3 << 19, 512 << 10, 1000]
    monkeypatch.setenv("INFRA_CONFIG_DIR", str(tmp_path))
    for bad in ("lots", "9" * 400 + "GiB"):
        assert main(["master", "--artifact-max-bytes", bad]) == 2
        assert f"infra master: --artifact-max-bytes: invalid size {bad!r}" in capsys.readouterr().err
    assert main(["master", "--artifact-max-bytes", "0"]) == 2
    assert "--artifact-max-bytes must be 1 byte to 16 EiB, not 0" in capsys.readouterr().err
    help_text = " ".join(_sub(build_parser(), "master").format_help().split())
    assert "(default 64GiB)" in help_text


@pytest.mark.timeout(120)
def test_the_demo_says_where_its_dashboard_is_first(tmp_path: Path) -> None:
    """Interrupted once it has submitted its plan: Ctrl-C stops its master and node and removes its
    directory."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "COLUMNS": "200"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "demo"], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        assert demo.stdout is not None
        first = [demo.stdout.readline() for _ in range(2)]
        assert first[0].startswith("master on 127.0.0.1:"), first
        url = first[1].removeprefix("dashboard on ").split()[0]
        assert first[1].startswith("dashboard on http://127.0.0.1:"), first
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and "<h1>Cluster</h1>" in page.read().decode()
        while not demo.stdout.readline().startswith("submitted "):  # its node is up: both are in procs
            assert demo.poll() is None, "the demo ended before submitting"
    finally:
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=60)
    assert not list(tmp_path.glob("infra-demo-*"))


def test_a_ctrl_c_while_the_master_starts_leaves_no_master_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``infra demo`` (and every test cluster) starts its master through start_master; an interrupt while it
    waits for the master to listen must stop that master, which the caller has no handle on yet."""
    from infra import demo

    spawned: list[subprocess.Popen[str]] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[str]:
        spawned.append(real_popen(*args, **kwargs))  # type: ignore[call-overload]
        return spawned[-1]

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.subprocess, "Popen", popen)
    # only the demo's own clock: subprocess's waits sleep through the real time module
    monkeypatch.setattr(demo, "time", SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    with pytest.raises(KeyboardInterrupt):
        demo.start_master(f"sqlite:///{tmp_path / 'm.db'}", dict(os.environ), tmp_path / "master.log")
    assert len(spawned) == 1 and spawned[0].poll() is not None  # stopped, not left running
