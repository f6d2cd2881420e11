"""The wire protocol (``infra.proto``) and its generated Python stubs."""

from __future__ import annotations

from protos import infra_pb2

PROTOCOL_VERSION: int = infra_pb2.PROTOCOL_VERSION_CURRENT
