"""Regenerate the committed Python stubs from ``protos/infra.proto``.

Run from anywhere: ``python protos/generate.py [OUT_DIR]``. The stubs import as
``from infra.protos import infra_pb2`` (the folder ``protos/`` installs as ``infra.protos``), so protoc must
see the file as ``infra/protos/infra.proto``: it is copied into a temporary include root of that shape and

    python -m grpc_tools.protoc -I<root> --python_out=<out> --pyi_out=<out> --grpc_python_out=<out> \\
        infra/protos/infra.proto

runs there; the three stubs are then copied to ``OUT_DIR/protos`` (default: the repository root, i.e.
beside the proto). The generator is pinned in setup.py's ``dev`` extra (grpcio-tools), so the committed
stubs stay reproducible (tests/control/test_proto.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "infra.proto"
AS_INSTALLED = Path("infra", "protos", "infra.proto")  # the proto's name as protoc and the stubs see it
STUBS = ("infra_pb2.py", "infra_pb2.pyi", "infra_pb2_grpc.py")


def generate(out_dir: Path = ROOT) -> None:
    """Write infra_pb2.py, infra_pb2.pyi and infra_pb2_grpc.py under ``out_dir/protos``."""
    with tempfile.TemporaryDirectory(prefix="infra-protoc-") as tmp:
        include, out = Path(tmp, "include"), Path(tmp, "out")
        (include / AS_INSTALLED).parent.mkdir(parents=True)
        out.mkdir()
        shutil.copyfile(PROTO, include / AS_INSTALLED)
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
        cmd += [f"--grpc_python_out={out}", AS_INSTALLED.as_posix()]
        subprocess.run(cmd, cwd=include, check=True)
        (out_dir / "protos").mkdir(parents=True, exist_ok=True)
        for name in STUBS:
            shutil.copyfile(out / AS_INSTALLED.parent / name, out_dir / "protos" / name)


if __name__ == "__main__":
    generate(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT)
