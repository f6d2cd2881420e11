"""The experiment record: where everything an experiment produces lives, named in one place.

::

    <workdir>/experiments/<experiment>/
      plan.json              the plan as submitted plus resolved defaults
      env.json               package versions, git commit, python, platform, devices
      data/                  the prepared data set (prepare's --out); data/selection.json
      logs/<stage>.log       stdout/stderr of a stage
      metrics/<stage>.jsonl  the stage's events (what CRYSTALLM_EVENTS points to)
      ckpts/                 last.pt, best.pt
      samples/<stage>/       sample, mcts and benchmark outputs
      probes/<probe>/        eval_<step>.pt.gz activation captures
      plots/                 training curves; plots/<probe>/ analysis tables and heatmaps
      artifacts/             anything else
      work/<stage>/          a stage process's working directory

Standard library only: the master side (which never imports torch) uses it too. A standalone
``crystallm train`` treats its ``out_dir`` as such a root (``ckpts/``, ``metrics/``, ``plots/``,
``probes/``). Experiment keys, stage and probe names become path components, so they are checked here
(the node checks what the master sends with these functions). Every per-stage path is nested under a
folder (``logs/``, ``metrics/``, ``work/``, ``samples/``, ``artifacts/``), so a stage may be named like a
top-level entry (:data:`RESERVED_NAMES`) without colliding with it.

A machine's workdir holds ``experiments/<key>/`` (:func:`experiment_dir`), ``nodes/`` and ``plugins/``
(:data:`WORKDIR_FOLDERS`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

PLAN_JSON = "plan.json"
ENV_JSON = "env.json"
SELECTION_JSON = "selection.json"
DATA = "data"
LOGS = "logs"
METRICS = "metrics"
CKPTS = "ckpts"
SAMPLES = "samples"
PROBES = "probes"
PLOTS = "plots"
ARTIFACTS = "artifacts"
WORK = "work"
FOLDERS = (DATA, LOGS, METRICS, CKPTS, SAMPLES, PROBES, PLOTS, ARTIFACTS, WORK)
# The top level of a machine's workdir: experiment records, node identities, plugin files (crystallm_core.plugins).
EXPERIMENTS = "experiments"
NODES = "nodes"
PLUGINS = "plugins"
WORKDIR_FOLDERS = (EXPERIMENTS, NODES, PLUGINS)
RESERVED_NAMES = frozenset({PLAN_JSON, ENV_JSON, *FOLDERS})
"""Top-level entries of an experiment folder (what :meth:`ExperimentLayout.ensure` and the record create)."""

# What list_artifacts calls the files of each top-level entry (the kinds of artifact events).
KINDS = {
    PLAN_JSON: "plan",
    ENV_JSON: "env",
    DATA: "data",
    LOGS: "log",
    METRICS: "metrics",
    CKPTS: "checkpoint",
    SAMPLES: "samples",
    PROBES: "probe",
    PLOTS: "plot",
    ARTIFACTS: "artifact",
}

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_NAME = 64  # stage names (a plan's names are at most 64 characters)
MAX_KEY = 128  # experiment keys: a plan's name, '-' and the master's experiment id
_PROBE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
PACKAGES = (
    "infra",
    "torch",
    "triton",
    "numpy",
    "pymatgen",
    "spglib",
    "matplotlib",
    "pydantic",
    "grpcio",
    "nvidia-ml-py",
    "omegaid",
    "chgnet",
)


class LayoutError(ValueError):
    """A name or path that does not fit the experiment layout; the message says which and why."""


def check_name(name: str, what: str = "name", limit: int = MAX_NAME) -> str:
    """A single path component: 1-``limit`` letters, digits, ``_ . -``, and not ``.`` or ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > limit or name in (".", ".."):
        raise LayoutError(
            f"{what} {name!r} must be 1-{limit} letters, digits, '_', '.' or '-' (it becomes a directory)"
        )
    return name


def check_stage_name(name: str) -> str:
    """A stage name that is a safe path component (its folders are nested, so no name is reserved)."""
    return check_name(name, "stage name")


def check_experiment_key(key: str) -> str:
    """An experiment key (``<plan name>-<id>``) that is a safe path component."""
    return check_name(key, "experiment key", MAX_KEY)


def check_probe_name(name: str) -> str:
    """Probe names are folder names under probes/ and plots/: no dots, so they never look like files."""
    if not isinstance(name, str) or not _PROBE_NAME.fullmatch(name):
        raise LayoutError(f"probe name {name!r} must be 1-64 letters, digits, '_' or '-'")
    return name


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the experiment root, POSIX separators
    kind: str  # see KINDS
    bytes: int


def experiment_dir(workdir: str | Path, key: str) -> Path:
    """The record of experiment ``key`` in a workdir: ``<workdir>/experiments/<key>`` (``key`` is checked
    as a single path component)."""
    return Path(workdir) / EXPERIMENTS / check_experiment_key(key)


class ExperimentLayout:
    """The paths of one experiment record rooted at ``root`` (nothing is created until :meth:`ensure`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def in_workdir(cls, workdir: str | Path, key: str) -> ExperimentLayout:
        """The record of experiment ``key`` in ``workdir`` (:func:`experiment_dir`)."""
        return cls(experiment_dir(workdir, key))

    def __repr__(self) -> str:
        return f"ExperimentLayout({str(self.root)!r})"

    @property
    def plan_json(self) -> Path:
        return self.root / PLAN_JSON

    @property
    def env_json(self) -> Path:
        return self.root / ENV_JSON

    @property
    def data_dir(self) -> Path:
        return self.root / DATA

    @property
    def selection_json(self) -> Path:
        return self.data_dir / SELECTION_JSON

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS

    def log_file(self, stage: str) -> Path:
        return self.logs_dir / f"{check_name(stage, 'stage name')}.log"

    @property
    def metrics_dir(self) -> Path:
        return self.root / METRICS

    def metrics_file(self, stage: str) -> Path:
        return self.metrics_dir / f"{check_name(stage, 'stage name')}.jsonl"

    @property
    def ckpts_dir(self) -> Path:
        return self.root / CKPTS

    @property
    def samples_root(self) -> Path:
        return self.root / SAMPLES

    def samples_dir(self, stage: str) -> Path:
        return self.samples_root / check_name(stage, "stage name")

    @property
    def probes_dir(self) -> Path:
        return self.root / PROBES

    def probe_dir(self, probe: str) -> Path:
        return self.probes_dir / check_probe_name(probe)

    def probe_capture(self, probe: str, step: int) -> Path:
        return self.probe_dir(probe) / f"eval_{int(step)}.pt.gz"

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS

    def probe_plots_dir(self, probe: str) -> Path:
        return self.plots_dir / check_probe_name(probe)

    @property
    def artifacts_dir(self) -> Path:
        return self.root / ARTIFACTS

    @property
    def work_root(self) -> Path:
        return self.root / WORK

    def work_dir(self, stage: str) -> Path:
        return self.work_root / check_name(stage, "stage name")

    def ensure(self) -> ExperimentLayout:
        """Create the root and every standard folder (per-stage folders are made by whoever writes them)."""
        for name in FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        return self

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the root, after resolving symlinks and ``..``; a path that lands outside the
        root is refused. A relative ``path`` is read as the file system reads it (from the current directory),
        like every path this layout hands out, so ``layout.relative(layout.ckpts_dir)`` is ``"ckpts"``."""
        full = Path(path).resolve()
        try:
            return full.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise LayoutError(f"path {str(path)!r} is outside the experiment directory {self.root}") from None

    def file(self, path: str) -> Path:
        """The regular file of the record that ``path`` (relative to the root, POSIX separators) names, resolved:
        how a file asked for from elsewhere (a client, through the master) is confined to the record. An
        absolute path, ``..``, or a link leading outside is a :class:`LayoutError`; a missing file is
        :class:`FileNotFoundError`."""
        rel = PurePosixPath(path)
        if not path or rel.is_absolute() or ".." in rel.parts or "\\" in path or "\0" in path:
            raise LayoutError(f"path {path!r} must be relative to the experiment directory, without '..'")
        full = self.root / rel
        self.relative(full)  # resolves links: one that leads outside is refused
        if not full.exists():
            raise FileNotFoundError(f"no file {path} in the experiment record")
        if not full.is_file():
            raise LayoutError(f"path {path!r} is not a regular file")
        return full.resolve()

    def list_artifacts(self) -> list[Artifact]:
        """Every file of the record, sorted by path: plan.json, env.json and the standard folders except
        ``work/`` (scratch). Hidden files (atomic writes in progress) and links leading outside are left out."""
        found: list[Artifact] = []
        for name, kind in KINDS.items():
            top = self.root / name
            if top.is_file():
                found.append(Artifact(name, kind, top.stat().st_size))
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in filenames:
                    if f.startswith("."):
                        continue
                    full = Path(dirpath) / f
                    try:
                        rel = self.relative(full)
                        size = full.stat().st_size
                    except (LayoutError, OSError):
                        continue
                    found.append(Artifact(rel, kind, size))
        return sorted(found, key=lambda a: a.path)


def _write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise LayoutError(f"{path.name}: not JSON-serialisable: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_plan_json(layout: ExperimentLayout, plan: dict[str, Any]) -> Path:
    """Record the plan (as submitted, defaults resolved by the caller) as ``plan.json``."""
    if not isinstance(plan, dict):
        raise LayoutError(f"plan.json: the plan must be a mapping, got {type(plan).__name__}")
    return _write_json(layout.plan_json, plan)


def _safe(fn: Any) -> Any:
    """A fact, or the reason it could not be read: gathering the environment never fails."""
    try:
        return fn()
    except Exception as e:  # any failure of one fact must not lose the others
        return {"error": f"{type(e).__name__}: {e}"}


def _packages() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict[str, Any] | None:
    """Commit of the checkout this code runs from, if it is one (read-only git calls, no index refresh)."""
    project = Path(__file__).resolve().parents[1]
    if not (project / ".git").exists():
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(project), *args], capture_output=True, text=True, timeout=10, env=env, check=True
        )
        return done.stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "path": str(project),
    }


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _nvidia_proc() -> dict[str, Any]:
    """Driver and GPU models from /proc (no nvidia-smi, no CUDA initialisation)."""
    facts: dict[str, Any] = {"driver": None, "gpus": []}
    if os.path.exists("/proc/driver/nvidia/version"):
        m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]+)", _read("/proc/driver/nvidia/version"))
        facts["driver"] = m.group(1) if m else None
    gpus_dir = Path("/proc/driver/nvidia/gpus")
    if gpus_dir.is_dir():
        for bus in sorted(gpus_dir.iterdir()):
            info = bus / "information"
            model = re.search(r"^Model:\s*(.+)$", _read(str(info)), re.M) if info.exists() else None
            facts["gpus"].append({"bus": bus.name, "name": model.group(1).strip() if model else None})
    return facts


def _devices() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvidia": _safe(_nvidia_proc),
    }
    torch = sys.modules.get("torch")  # asked only if the caller already paid for importing it
    if torch is not None:
        cuda = torch.cuda
        gpus = []
        if cuda.is_available():
            for i in range(cuda.device_count()):
                p = cuda.get_device_properties(i)
                gpus.append(
                    {
                        "index": i,
                        "name": p.name,
                        "memory_mib": p.total_memory // 2**20,
                        "capability": f"{p.major}.{p.minor}",
                    }
                )
        facts["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus}
    return facts


def environment() -> dict[str, Any]:
    """The facts of env.json; each one that cannot be read says why instead."""
    return {
        "time": round(time.time(), 3),
        "python": _safe(
            lambda: {
                "version": platform.python_version(),
                "implementation": platform.python_implementation(),
                "executable": sys.executable,
            }
        ),
        "platform": _safe(
            lambda: {
                "system": platform.system(),
                "release": platform.release(),
                "machine": platform.machine(),
                "platform": platform.platform(),
                "hostname": platform.node(),
            }
        ),
        "packages": _safe(_packages),
        "git": _safe(_git),
        "devices": _safe(_devices),
    }


def write_env_json(layout: ExperimentLayout) -> Path:
    """Record where and with what the experiment runs as ``env.json``."""
    return _write_json(layout.env_json, environment())
