"""The wire protocol (``infra.proto``) and its generated Python stubs."""

from __future__ import annotations

from infra.protos import infra_pb2

PROTOCOL_VERSION: int = infra_pb2.PROTOCOL_VERSION_CURRENT
# Set on every server and channel, both directions: a larger message is refused with RESOURCE_EXHAUSTED
# before it is parsed. Plans are limited far below this (infra.spec.plan.MAX_PLAN_BYTES).
MAX_MESSAGE_BYTES: int = 32 * 1024 * 1024
