"""The master's settings, with their defaults in one place.

``infra master`` reads its argparse defaults from :class:`Settings`, and :class:`Settings` takes the
controller's from :class:`ControllerOptions`, so a default is written once. Standard library only: the
``infra`` CLI imports this module to build its parser, for every verb.
"""

from __future__ import annotations

from dataclasses import dataclass

LOST_HEARTBEATS = 12  # the default lost timeout, in heartbeat intervals (docs/RELIABILITY.md says why)
ARTIFACT_MAX_BYTES = 64 << 30  # the largest file relayed to a client (a large model's checkpoint fits)


@dataclass(frozen=True, kw_only=True)
class ControllerOptions:
    """How the controller keeps time with its nodes."""

    heartbeat_interval: float = 5.0  # what nodes are told to keep
    persist_interval: float = 10.0  # how often the last heartbeats are written (they stay in memory between)
    lost_timeout: float | None = None  # a node silent this long is lost; None: LOST_HEARTBEATS intervals
    home_wait: float = 600.0  # how long an experiment waits for its lost home node before starting over
    artifact_max_bytes: int = ARTIFACT_MAX_BYTES  # files larger than this are not relayed to clients
    rendezvous_ports: tuple[int, int] = (29400, 29999)  # a gang's rendezvous port on member 0's node, inclusive

    def lost_after(self) -> float:
        if self.lost_timeout is not None:
            return self.lost_timeout
        return LOST_HEARTBEATS * self.heartbeat_interval


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything ``infra master`` is started with."""

    db_url: str
    bind: str = "127.0.0.1:50051"
    heartbeat_interval: float = ControllerOptions.heartbeat_interval
    lost_timeout: float | None = ControllerOptions.lost_timeout
    home_wait: float = ControllerOptions.home_wait
    persist_interval: float = ControllerOptions.persist_interval
    artifact_max_bytes: int = ControllerOptions.artifact_max_bytes
    rendezvous_ports: tuple[int, int] = ControllerOptions.rendezvous_ports
    auth: bool = False
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    log_level: str = "INFO"  # the master's log threshold
    web_port: int | None = 8080  # the dashboard and /metrics, on --bind's host; 0: any free port; None: off

    def controller(self) -> ControllerOptions:
        return ControllerOptions(
            heartbeat_interval=self.heartbeat_interval,
            persist_interval=self.persist_interval,
            lost_timeout=self.lost_timeout,
            home_wait=self.home_wait,
            artifact_max_bytes=self.artifact_max_bytes,
            rendezvous_ports=self.rendezvous_ports,
        )


def port_range(text: str) -> tuple[int, int]:
    """``"29400-29999"`` (or one port) -> (first, last); a clear error otherwise."""
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"rendezvous ports {text!r}: give FIRST-LAST, e.g. 29400-29999") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"rendezvous ports {text!r}: need 1024 <= FIRST <= LAST <= 65535")
    return lo, hi
