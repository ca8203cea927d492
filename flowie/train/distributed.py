"""torch.distributed set-up for `flowie train --arch full` under torchrun (or alone).

torchrun passes the process's place in ``env`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
the caller reads the environment and hands it here, so this module reads none itself. Back end:
NCCL for CUDA devices, gloo for the CPU.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: dict[str, str]) -> World:
    """The process's place from torchrun's variables (one process when they are absent)."""
    return World(rank=int(env.get("RANK", 0)), size=int(env.get("WORLD_SIZE", 1)), local_rank=int(env.get("LOCAL_RANK", 0)))


def device_for(requested: str, world: World) -> torch.device:
    """``cuda`` under torchrun means this process's local GPU; anything else as given."""
    if requested == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return torch.device(requested)


def start(world: World, device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group (a no-op for one process)."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()


def wrap(module: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` when there is more than one process; the module itself otherwise."""
    if not world.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, )


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a scalar over all processes (for logging the loss)."""
    if not world.distributed:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world.size
