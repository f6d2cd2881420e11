"""One installed namespace: the cluster side installs under ``infra.*``, never as generic top-level names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "crystallm_core", "infra", "master", "node", "protos", "plugins")
SOURCES += ("spec",)


def test_the_wheel_installs_only_infra_and_crystallm_core(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ and infra.egg-info/ beside setup.py, which must not appear
    # in the checkout (an egg-info there is a second "infra" distribution to importlib.metadata).
    src = tmp_path / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("infra-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"infra", "crystallm_core"}  # no master, node, protos, plugins or spec of their own
    for package in ("infra/master", "infra/node", "infra/protos", "infra/plugins/scorers", "infra/spec"):
        assert f"{package}/__init__.py" in names
    assert {"infra/protos/infra.proto", "infra/master/migrations/alembic.ini"} <= set(names)
    dashboard = {"app.js", "chart.js", "experiment.js", "style.css"}  # served by the master, nothing fetched elsewhere
    assert {f"infra/master/static/{f}" for f in dashboard} <= set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode().replace(" ", "")
    assert "[crystallm.plugins]" in text and "random-scorer=infra.plugins.scorers.random_scorer" in text
    assert "infra=infra.cli:main" in text
