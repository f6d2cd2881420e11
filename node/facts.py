"""What a node is (registered once) and how busy it is (sent with every heartbeat).

GPUs are read through NVML (``pynvml`` from the ``nvidia-ml-py`` package). No GPU, no driver or
no ``pynvml`` is a valid, GPU-less node; the reason is reported in the facts' ``nvml`` field. The old
``nvidia-ml-py3`` package (pulled in by some libraries) overwrites ``pynvml.py`` with a 2017 copy;
that is detected and reported with the fix, instead of failing later in odd ways.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from infra.stages import get_stage_kind, stage_kinds

SOFTWARE = ("infra", "torch", "grpcio", "protobuf", "pymatgen", "nvidia-ml-py")
EXTRAS = {"chgnet": "chgnet", "oid": "omegaid"}  # extra -> distribution that provides it
# Present in every nvidia-ml-py >= 11, absent from nvidia-ml-py3 7.x (NVML 7.5 era).
MODERN_NVML_MARKERS = ("nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetComputeRunningProcesses_v2")
# Reinstalling nvidia-ml-py puts its pynvml.py back; nvidia-ml-py3 stays (chgnet imports its nvidia_smi).
NVML_FIX = "pip install --force-reinstall --no-deps nvidia-ml-py"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def nvml_binding(pynvml: Any) -> str | None:
    """None when ``pynvml`` is the modern binding; otherwise what is wrong and how to fix it."""
    missing = [f for f in MODERN_NVML_MARKERS if not hasattr(pynvml, f)]
    if not missing:
        return None
    old = _version("nvidia-ml-py3")
    origin = f"nvidia-ml-py3 {old}" if old else "an old NVML binding"
    return (
        f"pynvml at {getattr(pynvml, '__file__', '?')} comes from {origin} (it lacks {', '.join(missing)}) "
        f"and shadows nvidia-ml-py; fix: {NVML_FIX}"
    )


@dataclass
class Gpus:
    """Detected GPUs and how to read their usage; ``fake`` GPUs advertise capacity only."""

    gpus: list[dict[str, Any]] = field(default_factory=list)
    status: str = ""
    handles: list[Any] = field(default_factory=list)
    nvml: Any = None

    def usage(self) -> list[dict[str, Any]]:
        out = []
        for g, h in zip(self.gpus, self.handles or [None] * len(self.gpus), strict=True):
            util, used = 0.0, 0
            if h is not None:
                try:
                    util = float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    used = int(self.nvml.nvmlDeviceGetMemoryInfo(h).used) // (1 << 20)
                except Exception:  # a GPU fallen off the bus reads as idle rather than killing heartbeats
                    pass
            out.append(
                {
                    "index": g["index"],
                    "utilization_percent": util,
                    "memory_used_mib": used,
                    "memory_total_mib": g["memory_mib"],
                }
            )
        return out


def probe_gpus(fake: int | None = None) -> Gpus:
    if fake is not None:
        gpus = [
            {"index": i, "uuid": f"fake-{i}", "name": "fake GPU", "memory_mib": 0, "driver_version": ""}
            for i in range(fake)
        ]
        return Gpus(gpus, f"not used: {fake} fake GPU(s) advertised (--fake-gpus)")
    try:
        import pynvml
    except ImportError:
        return Gpus(status="no pynvml (pip install nvidia-ml-py); GPUs are not detected")
    problem = nvml_binding(pynvml)
    if problem:
        return Gpus(status=problem)
    try:
        pynvml.nvmlInit()
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus, handles = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                {
                    "index": i,
                    "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
                    "name": _text(pynvml.nvmlDeviceGetName(h)),
                    "memory_mib": int(mem.total) // (1 << 20),
                    "driver_version": driver,
                }
            )
            handles.append(h)
    except pynvml.NVMLError as e:
        return Gpus(status=f"NVML unavailable: {e}")
    return Gpus(gpus, f"ok (nvidia-ml-py {_version('nvidia-ml-py') or '?'}, driver {driver})", handles, pynvml)


def available_verbs() -> set[str]:
    """``crystallm`` verbs this installation has (their modules exist); nothing is imported but the CLI table."""
    try:
        from crystallm_core.cli import VERBS
    except ImportError:
        return set()
    return {verb for verb, (module, _) in VERBS.items() if importlib.util.find_spec(module) is not None}


def runnable_kinds() -> list[str]:
    verbs = available_verbs()
    return [k for k in stage_kinds() if set(get_stage_kind(k).verbs) <= verbs]


def software() -> dict[str, str]:
    out = {"python": platform.python_version()}
    out.update({name: v for name in SOFTWARE if (v := _version(name))})
    return out


def extras() -> list[str]:
    return sorted(extra for extra, dist in EXTRAS.items() if _version(dist))


def disk_free_mib(path: Path) -> int:
    return psutil.disk_usage(str(path)).free // (1 << 20)


def collect_facts(workdir: Path, name: str, gpus: Gpus, cpus: float | None, memory_mib: int | None) -> dict[str, Any]:
    """The NodeFacts fields; ``cpus``/``memory_mib`` override what is advertised (e.g. to share a machine)."""
    return {
        "hostname": socket.gethostname(),
        "name": name,
        "gpus": gpus.gpus,
        "cpu_count": int(cpus if cpus is not None else (os.cpu_count() or 1)),
        "memory_mib": memory_mib if memory_mib is not None else psutil.virtual_memory().total // (1 << 20),
        "disk_free_mib": disk_free_mib(workdir),
        "software": software(),
        "extras": extras(),
        "stage_kinds": runnable_kinds(),
        "nvml": gpus.status,
        "workdir": str(workdir),
    }


def usage(workdir: Path, gpus: Gpus) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_used_mib": (vm.total - vm.available) // (1 << 20),
        "memory_total_mib": vm.total // (1 << 20),
        "gpus": gpus.usage(),
        "disk_free_mib": disk_free_mib(workdir),
    }
