"""What a node is (registered once) and how busy it is (sent with every heartbeat).

GPUs are read through NVML (``pynvml`` from the ``nvidia-ml-py`` package). No GPU, no driver or
no ``pynvml`` is a valid, GPU-less node; the reason is reported in the facts' ``nvml`` field. The old
``nvidia-ml-py3`` package (pulled in by some libraries) overwrites ``pynvml.py`` with a 2017 copy;
that is detected and reported with the fix, instead of failing later in odd ways.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from infra.spec.stages import get_stage_kind, stage_kinds

SOFTWARE = ("infra", "torch", "grpcio", "protobuf", "pymatgen", "nvidia-ml-py")
EXTRAS = {"chgnet": "chgnet", "oid": "omegaid"}  # extra -> distribution that provides it
# Present in every nvidia-ml-py >= 11, absent from nvidia-ml-py3 7.x (NVML 7.5 era).
MODERN_NVML_MARKERS = ("nvmlDeviceGetCudaComputeCapability", "nvmlDeviceGetComputeRunningProcesses_v2")
# Reinstalling nvidia-ml-py puts its pynvml.py back; nvidia-ml-py3 stays (chgnet imports its nvidia_smi).
NVML_FIX = "pip install --force-reinstall --no-deps nvidia-ml-py"
PLUGIN_KINDS = ("scorer", "vocab", "model", "metric")  # registered names a node lists as extras "KIND:NAME"
LISTING_STARTUP_S = 60.0  # for `crystallm plugins list` to import torch (twice: it probes plugins in a child)
LISTING_NICE = 10  # niceness added: the listing yields the CPU to the stages and agents already running on the machine


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


@dataclass
class PluginListing:
    """``crystallm plugins list --json`` of a workdir, run as a subprocess: it imports torch and untrusted
    plugin code, neither of which may enter (or wedge) the long-lived agent. Started early so that it runs
    while the agent does the rest of its start; :meth:`result` waits for it, within a bounded time."""

    proc: subprocess.Popen[str]
    workdir: Path
    limit: float
    started: float

    @classmethod
    def start(cls, workdir: Path, timeout: float) -> PluginListing:
        """``timeout``: seconds each plugin may take to import (then it is reported and skipped)."""
        cmd = [sys.executable, "-m", "crystallm_core.cli", "plugins", "list", "--json"]
        cmd += ["--workdir", str(workdir), "--timeout", f"{timeout:g}"]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        with contextlib.suppress(OSError):  # it is importing still; what it starts inherits the priority
            os.setpriority(os.PRIO_PROCESS, proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + LISTING_NICE))
        return cls(proc, workdir, LISTING_STARTUP_S + 2 * timeout, time.monotonic())

    def result(self) -> tuple[list[str], list[str]]:
        """(extras ``KIND:NAME`` for every registered scorer, vocabulary, model size and metric; warnings).
        Stage plugins of the workdir are not listed there: the agent loads and reports those itself."""
        try:
            out, err = self.proc.communicate(timeout=max(0.0, self.started + self.limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc)
            return [], [
                f"crystallm plugins list did not finish within {self.limit:g}s: no scorer, vocabulary, model or "
                "metric plugins are advertised (mcts stages are not placed here)"
            ]
        if self.proc.returncode != 0:
            last = (err.strip().splitlines() or ["no output"])[-1]
            return [], [f"crystallm plugins list exited with {self.proc.returncode} ({last}): no plugins advertised"]
        try:
            report = json.loads(out)
            extras = sorted({f"{r['kind']}:{r['name']}" for r in report["registered"] if r["kind"] in PLUGIN_KINDS})
            failed = [(f["source"], f["error"]) for f in report["failed"]]
        except (ValueError, KeyError, TypeError) as e:
            return [], [f"crystallm plugins list printed no report ({type(e).__name__}: {e}): no plugins advertised"]
        warnings = [f"plugin {src} skipped: {error}" for src, error in failed]  # stage plugins are not its business
        return extras, warnings


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """Kill the listing and what it started (its plugin probe runs in a session of its own)."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def route_address(master: str) -> str:
    """This machine's address on its route to ``master`` (``host:port``): the default ``--advertise-address``,
    the address other nodes of a gang reach this one at. A UDP socket is connected, which sends nothing and
    only picks the route; "" when there is none (the node then hosts no gang)."""
    host, _, port = master.rpartition(":")
    host = host.strip("[]") or master
    try:
        family = socket.getaddrinfo(host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, int(port) if port.isdigit() else 9))
            return str(s.getsockname()[0])
    except (OSError, ValueError, IndexError):
        return ""
