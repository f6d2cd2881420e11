"""``infra master|node --print-systemd-unit``: the printed units parse and carry the options given."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _unit(tmp_path: Path, *args: str) -> tuple[str, dict[str, dict[str, list[str]]]]:
    env = {**os.environ, "INFRA_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("INFRA_JOIN_TOKEN", None)
    out = subprocess.run(
        [sys.executable, "-m", "infra.cli", *args, "--print-systemd-unit"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=True,
    ).stdout
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in out.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            assert line.endswith("]") and line[1:-1] not in sections, line
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, line
        key, value = line.split("=", 1)
        current.setdefault(key, []).append(value)
    return out, sections


def _verify(tmp_path: Path, name: str, text: str) -> None:
    if shutil.which("systemd-analyze") is None:
        return
    path = tmp_path / name
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [x for x in done.stderr.splitlines() if name in x]  # other units on this machine are not ours
    assert done.returncode == 0 or not problems, done.stderr


def test_the_printed_units_parse_and_carry_the_options(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("inf1.x.y")
    text, node = _unit(
        tmp_path,
        "node",
        "--master",
        "10.1.2.3:50051",
        "--workdir",
        "wd",
        "--name",
        "gpu-1",
        "--heartbeat",
        "2",
        "--stop-deadline",
        "120",
        "--join-token-file",
        "token",
    )
    assert set(node) == {"Unit", "Service", "Install"}
    exec_start = node["Service"]["ExecStart"][0].split()
    assert exec_start[:4] == [sys.executable, "-m", "infra.cli", "node"] and Path(exec_start[0]).is_absolute()
    args = dict(zip(exec_start[4::2], exec_start[5::2], strict=True))
    assert args["--master"] == "10.1.2.3:50051" and args["--name"] == "gpu-1" and args["--heartbeat"] == "2.0"
    assert args["--workdir"] == str((tmp_path / "wd").resolve())  # absolute: a service runs in /
    assert args["--join-token-file"] == str(tmp_path / "token") and args["--stop-deadline"] == "120"
    service = {k: v[-1] for k, v in node["Service"].items()}
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "process"
    assert service["Restart"] == "on-failure" and int(service["TimeoutStopSec"]) >= 120 + 30
    assert "network-online.target" in node["Unit"]["After"][0] and node["Install"]["WantedBy"] == ["multi-user.target"]
    assert "inf1.x.y" not in text  # never a secret in a unit file
    _verify(tmp_path, "infra-node.service", text)

    text, master = _unit(tmp_path, "master", "--db", "sqlite:///m.db", "--bind", "0.0.0.0:50051", "--auth")
    exec_start = master["Service"]["ExecStart"][0].split()
    assert exec_start[3:] == ["master", "--db", f"sqlite:///{tmp_path / 'm.db'}", "--bind", "0.0.0.0:50051", "--auth"]
    service = {k: v[-1] for k, v in master["Service"].items()}
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure" and "KillMode" not in service
    _verify(tmp_path, "infra-master.service", text)


def test_exec_start_words_are_escaped() -> None:
    from infra.systemd import quote

    assert quote("/a/b-c.py") == "/a/b-c.py"
    assert quote("50%") == '"50%%"' and quote("$HOME") == '"$$HOME"'
    assert quote('a b"c\\d') == '"a b\\"c\\\\d"'


@pytest.mark.parametrize("bad", ["-1"])
def test_a_negative_stop_deadline_is_refused(tmp_path: Path, bad: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "infra.cli", "node", "--workdir", str(tmp_path), "--stop-deadline", bad],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--stop-deadline" in done.stderr
