"""Regenerate the committed Python stubs from ``protos/infra.proto``.

Run from anywhere: ``python protos/generate.py [OUT_DIR]``. This is exactly
``python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/infra.proto``
run in the repository root (with ``OUT_DIR`` instead of ``.`` for the outputs), so the stubs import
as ``from protos import infra_pb2``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protos/infra.proto"


def generate(out_dir: Path = ROOT) -> None:
    """Write infra_pb2.py, infra_pb2.pyi and infra_pb2_grpc.py under ``out_dir/protos``."""
    out = str(out_dir)
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out}", f"--pyi_out={out}"]
    cmd += [f"--grpc_python_out={out}", PROTO]
    subprocess.run(cmd, cwd=ROOT, check=True)


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
