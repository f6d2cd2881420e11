"""Node facts: NVML binding detection, fake GPUs, and no torch in the agent."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

from infra.node import facts


def test_old_pynvml_is_reported_with_the_fix() -> None:
    old = types.ModuleType("pynvml")
    old.__file__ = "/site-packages/pynvml.py"
    old.nvmlInit = lambda: None  # the 2017 nvidia-ml-py3 binding has the basics only
    problem = facts.nvml_binding(old)
    assert problem is not None
    assert "nvmlDeviceGetCudaComputeCapability" in problem and "/site-packages/pynvml.py" in problem
    assert facts.NVML_FIX in problem and "--force-reinstall" in facts.NVML_FIX


def test_modern_pynvml_is_accepted() -> None:
    import pynvml

    assert facts.nvml_binding(pynvml) is None


def test_no_gpu_is_a_valid_node() -> None:
    gpus = facts.probe_gpus()
    assert isinstance(gpus.gpus, list) and gpus.status  # here: no NVML library; the reason is given
    if not gpus.gpus:
        assert gpus.usage() == []


def test_fake_gpus_and_overrides(tmp_path: Path) -> None:
    gpus = facts.probe_gpus(fake=2)
    f = facts.collect_facts(tmp_path, "n", gpus, cpus=3, memory_mib=1024)
    assert [g["index"] for g in f["gpus"]] == [0, 1] and f["cpu_count"] == 3 and f["memory_mib"] == 1024
    assert f["software"]["python"] and "grpcio" in f["software"] and f["disk_free_mib"] > 0
    assert set(f["stage_kinds"]) >= {"prepare", "evaluate"}
    usage = facts.usage(tmp_path, gpus)
    assert [g["index"] for g in usage["gpus"]] == [0, 1] and usage["memory_total_mib"] > 0


def test_the_agent_and_master_never_import_torch_or_the_model_library() -> None:
    code = (
        "import sys, json; from pathlib import Path\n"
        "import infra.cli, infra.client, infra.spec.plan, infra.spec.stages, infra.local, infra.demo\n"
        "import infra.master.server, infra.master.controller, infra.node.agent\n"
        "from infra.node import facts\n"
        "facts.collect_facts(Path('.'), 'n', facts.probe_gpus(), None, None)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    assert not loaded & {"torch", "pymatgen"}
    assert not {m for m in _imports_of("master") if m.split(".")[0] == "crystallm_core"}
    # the contract and the wire (imported by the master) use none of crystallm_core; the commands and the node
    # only the experiment layout and the plugin loader, which are standard library only
    for package in ("spec", "protos"):
        assert not {m for m in _imports_of(package) if m.split(".")[0] == "crystallm_core"}
    torch_free = {"crystallm_core.layout", "crystallm_core.plugins"}
    for package in ("infra", "node"):
        assert {m for m in _imports_of(package) if m.split(".")[0] == "crystallm_core"} <= torch_free | {
            "crystallm_core.cli"  # node/facts.py reads its table of verbs (each verb imports its module lazily)
        }


def _imports_of(package: str) -> set[str]:
    """Every module named by an import line of the package (lazy imports inside functions included)."""
    root = Path(__file__).resolve().parents[2] / package
    found = set()
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1:
                found.add(words[1])
    return found
