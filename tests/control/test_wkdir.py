"""infra-wkdir: where the node's workdir is remembered, and the agent refusing to start without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra import wkdir


def test_set_get_clear(config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "a" / "work"
    assert wkdir.main(["--get"]) == 1
    assert "infra-wkdir --set" in capsys.readouterr().err
    assert wkdir.main(["--set", str(target)]) == 0
    assert (config_dir / "wkdir").read_text().strip() == str(target)
    assert {p.name for p in target.iterdir()} == {"experiments", "nodes", "plugins"}
    capsys.readouterr()
    assert wkdir.main(["--get"]) == 0 and capsys.readouterr().out.strip() == str(target)
    assert wkdir.main(["--clear"]) == 0 and wkdir.get_workdir() is None
    assert target.exists()  # clearing forgets the setting, never the files


def test_config_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("INFRA_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert wkdir.config_dir() == tmp_path / "xdg" / "infra"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert wkdir.config_dir() == tmp_path / "home" / ".config" / "infra"
    monkeypatch.setenv("INFRA_CONFIG_DIR", str(tmp_path / "explicit"))
    assert wkdir.config_dir() == tmp_path / "explicit"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_unwritable_workdir_is_refused(config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert wkdir.main(["--set", str(ro / "work")]) == 1
    finally:
        ro.chmod(0o700)
    assert "is not usable" in capsys.readouterr().err and not (config_dir / "wkdir").exists()


def test_a_file_is_not_a_workdir(config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert wkdir.main(["--set", str(f)]) == 1
    assert f"workdir {f} is not usable" in capsys.readouterr().err


def test_node_refuses_to_start_without_a_workdir(config_dir: Path) -> None:
    env = {**os.environ, "INFRA_CONFIG_DIR": str(config_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "infra.cli", "node", "--master", "127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no workdir is configured" in result.stderr and "infra-wkdir --set /path/to/workdir" in result.stderr


def test_node_identity_persists(tmp_path: Path) -> None:
    from infra.node.identity import node_id

    first = node_id(tmp_path, "gpu-01")
    assert node_id(tmp_path, "gpu-01") == first != node_id(tmp_path, "gpu-02")
    assert (tmp_path / "nodes" / "gpu-01.json").exists()
