"""Data parallelism applied from outside the model (the torchtitan way): ``model.py`` stays written for one
device, and this module reads the standard ``torch.distributed.run`` environment, starts the process
group and wraps the model.

Only the torchrun variables are read: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
``MASTER_PORT``, through ``init_process_group``'s ``env://``). Without ``RANK`` and ``WORLD_SIZE`` in
the environment nothing is started and :func:`setup` returns a single-process :class:`Dist` whose
helpers do nothing, so the plain ``crystallm train`` path is unchanged. Under torchrun (any world size,
1 included) the process group is NCCL on CUDA and gloo on the CPU, and the model is wrapped by
:func:`wrap`: ``DistributedDataParallel`` (``parallel: ddp``) or FSDP2's ``fully_shard`` per block and
at the root (``parallel: fsdp``, for models that do not fit one GPU).

Full state dicts (:func:`model_state`, :func:`optimizer_state`) give the same checkpoint format as a
single process (parameter names as in ``GPT.state_dict()``, optimizer state keyed by parameter index),
so a checkpoint written at any world size loads at any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: rank, world size, its device; ``active`` when a process group runs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(env: dict[str, str] | None = None) -> Dist:
    """The torchrun environment, read without starting anything; a single process when it is absent."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Dist()
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(
            f"RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r}: not the integers torchrun sets"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return Dist(rank=rank, world=world, local_rank=local, active=True)


def device_for(name: str, d: Dist) -> torch.device:
    """The device of this rank: under torchrun ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if not d.active or device.type != "cuda":
        return device
    if device.index is not None and d.world > 1:
        raise ValueError(f"device {name!r}: under torchrun each rank takes cuda:LOCAL_RANK; write device: cuda")
    return torch.device("cuda", d.local_rank if device.index is None else device.index)


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Read the environment, pick this rank's device and start the process group (once per process)."""
    d = from_env()
    device = device_for(device_name, d)
    if d.active and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return d, device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module, device: torch.device, d: Dist, compile_blocks: bool) -> None:
    """FSDP2 in place over all ranks: each transformer block is its own unit (compiled first, in place,
    so parameter names do not change), then the root holds the embeddings, final norm and tied head.
    ``model`` may still be on the CPU: each unit's parameters move to ``device`` as they are sharded, so
    the whole model never sits on one GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError("parallel fsdp: the model has no `blocks` list to shard")
    mesh = init_device_mesh(device.type, (d.world,))
    for block in blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_mean(value: float, d: Dist, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (``value`` itself in a single process)."""
    if not d.active or d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / d.world


def all_sum_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (nothing in a single process)."""
    if d.active and d.world > 1:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any, d: Dist) -> list[Any]:
    if not d.active or d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.active and d.world > 1:
        dist.barrier()


# Full state dicts of an FSDP2 model, in the single-process format.


def _full(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _param_names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in the order of its indices in ``opt.state_dict()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered to rank 0 on the CPU (every rank must call it; ranks other than 0 get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Gathered to rank 0 and keyed by parameter index as ``opt.state_dict()`` is (collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, opt, options=_full(cpu_offload=True))
    if not osd:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, opt))}
    return {
        "state": {index[k]: v for k, v in osd["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]],
    }


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full())


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process-format optimizer state (read by every rank) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, opt)
    osd = {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, opt, osd, options=_full())
