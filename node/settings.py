"""The node agent's settings: one typed dataclass, whose defaults are the ``infra node`` flags' defaults.

Standard library only (the command line reads the defaults without loading the agent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from crystallm_core.plugins import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from infra.protos.transport import ClientTls


@dataclass
class Options:
    master: str
    workdir: Path
    name: str
    heartbeat: float = 5.0  # seconds between heartbeats (the master may ask for a shorter interval)
    cpus: int | None = None  # advertise this many CPUs instead of the machine's count
    memory_mib: int | None = None  # advertise this much memory instead of the machine's
    fake_gpus: int | None = None  # advertise N fake GPUs instead of NVML's (testing)
    token: str | None = None
    tls: ClientTls | None = None
    spool_limit_mib: int = 256  # events kept on disk while the master is away
    min_free_disk_mib: int = 1024  # take no new stage below this much free space in the workdir
    stop_free_disk_mib: int | None = None  # stop a running stage below this much; default: half of min_free_disk_mib
    plugin_timeout: float = DEFAULT_TIMEOUT  # seconds a stage-kind plugin may take to import
    stop_deadline: float = 60.0  # on SIGTERM/SIGINT, how long running stages may take to finish
    log_level: str = "INFO"  # the agent's log threshold (the stages' own output is never filtered)
    advertise_address: str | None = None  # where other nodes reach this one (gangs); None: the local address
    # of this machine's route to the master (node.facts.route_address)
