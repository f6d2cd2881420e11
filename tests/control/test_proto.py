"""The committed stubs are what protoc makes of infra.proto today."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("infra_pb2.py", "infra_pb2.pyi", "infra_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from infra.protos.generate import generate

    generate(tmp_path)
    drifted = [n for n in STUBS if (tmp_path / "protos" / n).read_bytes() != (ROOT / "protos" / n).read_bytes()]
    assert not drifted, f"stale stubs {drifted}: run `python protos/generate.py` and commit the result"


def test_protocol_version_comes_from_the_proto() -> None:
    from infra.protos import PROTOCOL_VERSION, infra_pb2

    assert PROTOCOL_VERSION == infra_pb2.ProtocolVersion.Value("PROTOCOL_VERSION_CURRENT") == 1
    assert infra_pb2.DESCRIPTOR.package == "infra.v1"
