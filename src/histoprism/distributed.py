"""torchrun / DDP context: rank, world size, device, and the collective ops training needs.

One process when not launched by torchrun; otherwise gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def launch_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) in a plain process. For work split by
    slide, which needs no process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_share(items: list) -> list:
    """This process's slides: every WORLD_SIZE-th item from RANK (all of them without torchrun)."""
    rank, world = launch_rank()
    return items[rank::world]


def local_device() -> torch.device:
    """The GPU torchrun gave this process (LOCAL_RANK), or the CPU when there is none."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """torchrun's rank and world size (1 process when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def shard(self, items: list) -> list:
        """This rank's share; every rank gets the same count so that DDP steps stay in lockstep."""
        if self.world == 1:
            return items
        n = max(1, len(items) // self.world)  # fewer slides than ranks: some ranks repeat a slide
        return [items[(self.rank + i * self.world) % len(items)] for i in range(n)]
