"""Plugins in a node's workdir: stage kinds imported by the agent (a broken or hanging one is reported and
skipped), scorers and other plugins listed in a subprocess and advertised as extras that place stages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cluster

pytestmark = pytest.mark.timeout(240)

RELAX = '''
import sys

from infra.spec.stages import Command, Resources, Spec, StageContext, StageKind, register_stage

SCRIPT = """
import sys
from pathlib import Path
from crystallm_core.events import open_sink
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
(out / "relaxed.txt").write_text(sys.argv[2])
with open_sink(".") as sink:
    sink.metric(0, steps=float(sys.argv[2]))
    sink.artifact(out / "relaxed.txt", "report")
print("relaxed in", sys.argv[2], "steps")
"""


class RelaxParams(Spec):
    steps: int = 3


def build(p: RelaxParams, ctx: StageContext) -> Command:
    argv = [sys.executable, "-c", SCRIPT, str(ctx.artifacts_dir), str(p.steps)]
    return Command([argv], outputs=[ctx.rel(ctx.artifacts_dir)])


register_stage("relax", StageKind(RelaxParams, build, Resources(0, 1, 256), description="a workdir plugin"))
'''
VOLUME = """
from crystallm_core.scorers import Scorer, ScoreResult, register_scorer


class Volume(Scorer):
    name = "volume"

    def score(self, cifs):
        return [ScoreResult(score=0.0) for _ in cifs]


register_scorer("volume", lambda: Volume())
"""
PLUGINS = {
    "stage/relax.py": RELAX,
    "stage/broken.py": "raise RuntimeError('no relaxer here')\n",
    "stage/hang.py": "import time\n\ntime.sleep(3600)\n",
    "scorer/volume.py": VOLUME,
    "scorer/bad_scorer.py": "import no_such_module_anywhere\n",
}


def _write_plugins(workdir: Path) -> None:
    for rel, text in PLUGINS.items():
        (workdir / "plugins" / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / "plugins" / rel).write_text(text)


def _stage(exp: dict[str, Any]) -> dict[str, Any]:
    return exp["stages"][0]


def test_a_node_offers_and_runs_its_workdir_plugins_and_reports_the_broken_ones(cluster: Cluster) -> None:
    cluster.start_master()
    _write_plugins(cluster.workdir("w"))
    cluster.start_node("w", "--plugin-timeout", "2")
    node = cluster.wait_online("w", timeout=120)["w"]
    assert {"relax", "probe"} <= set(node["stage_kinds"])  # the workdir's and $INFRA_STAGE_MODULES' kinds
    assert {"scorer:volume", "scorer:random", "vocab:cif-v1", "model:tiny"} <= set(node["extras"])
    warnings = node["warnings"]
    broken = [w for w in warnings if "broken.py" in w]
    assert len(broken) == 1 and "failed to import: RuntimeError: no relaxer here" in broken[0]
    assert any("hang.py did not finish importing within 2s" in w for w in warnings)
    assert any("bad_scorer.py skipped: ModuleNotFoundError" in w for w in warnings)
    assert not any("volume.py" in w or "relax.py" in w for w in warnings)

    key = cluster.submit({"name": "wp", "stages": [{"name": "relax", "kind": "relax", "params": {"steps": 5}}]})
    exp = cluster.wait_finished(key)
    assert exp["state"] == "succeeded", json.dumps(exp, indent=1)
    logs = cluster.cli("logs", f"{key}/relax").stdout
    assert "relaxed in 5 steps" in logs
    artifacts = json.loads(cluster.cli("artifacts", key, "--json").stdout)
    assert [a["path"] for a in artifacts] == [f"experiments/{key}/artifacts/relax/relaxed.txt"]
    record = cluster.workdir("w") / "experiments" / key
    assert (record / "artifacts" / "relax" / "relaxed.txt").read_text() == "5"
    assert "relaxed in 5 steps" in (record / "logs" / "relax.log").read_text()
    assert json.loads((record / "plan.json").read_text())["stages"][0]["params"] == {"steps": 5}
    local = cluster.cli("artifacts", "--local", str(record), "--json").stdout
    assert "artifacts/relax/relaxed.txt" in {a["path"] for a in json.loads(local)}

    # an mcts stage goes only where its scorer is registered: nowhere for an unknown one
    mcts = {"prompt": "NaCl", "iterations": 2}
    cpu = {"gpus": 0, "cpus": 1, "memory": "1GiB"}
    nowhere = cluster.submit(
        {
            "name": "nope",
            "resources": cpu,
            "stages": [{"name": "m", "kind": "mcts", "params": {**mcts, "scorer": "nope"}}],
        }
    )
    here = cluster.submit(
        {
            "name": "vol",
            "resources": cpu,
            "stages": [{"name": "m", "kind": "mcts", "params": {**mcts, "scorer": "volume"}}],
        }
    )
    placed = _stage(cluster.wait_finished(here))  # runs on w, and fails there: this experiment trained no model
    assert [a["node"] for a in placed["attempts"]] == ["w"] and "exited with" in placed["attempts"][0]["message"]
    waiting = _stage(cluster.status(nowhere)["experiments"][0])
    assert waiting["state"] == "ready" and waiting["attempts"] == []
    cluster.cli("cancel", nowhere)
