"""One installed namespace: the cluster side installs under ``infra.*``, never as generic top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_infra_and_crystallm_core(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("infra-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"infra", "crystallm_core"}  # no master, node, protos, plugins or spec of their own
    for package in ("infra/master", "infra/node", "infra/protos", "infra/plugins/scorers", "infra/spec"):
        assert f"{package}/__init__.py" in names
    assert {"infra/protos/infra.proto", "infra/master/migrations/alembic.ini"} <= set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "=infra.plugins.scorers." in text.replace(" ", "") and "infra=infra.cli:main" in text.replace(" ", "")
