"""torchrun / DDP context: rank, world size, device, and the collective ops training needs.

One process when not launched by torchrun; otherwise gloo on CPUs, NCCL on GPUs. torch is
imported inside the functions that need it, so ``torchrun_env`` costs nothing to import (the CLI
and the progress bars ask for the rank without loading torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def torchrun_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as torchrun sets them; (0, 1, 0) in a plain process.

    The one place these variables are read. Needs no process group (work split by slide)."""
    env = os.environ
    return (
        int(env.get("RANK", "0")),
        int(env.get("WORLD_SIZE", "1")),
        int(env.get("LOCAL_RANK", "0")),
    )


def rank_share(items: list) -> list:
    """This process's slides: every WORLD_SIZE-th item from RANK (all of them without torchrun)."""
    rank, world, _ = torchrun_env()
    return items[rank::world]


def local_device() -> torch.device:
    """The GPU torchrun gave this process (LOCAL_RANK), or the CPU when there is none."""
    import torch

    if torch.cuda.is_available():
        return torch.device(f"cuda:{torchrun_env()[2]}")
    return torch.device("cpu")


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """torchrun's rank and world size (1 process when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=_cpu)

    @classmethod
    def from_env(cls) -> DistContext:
        import torch
        import torch.distributed as dist

        _, world, local = torchrun_env()
        cuda = torch.cuda.is_available()
        if world == 1:
            return cls(device=torch.device("cuda" if cuda else "cpu"))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def shard(self, items: list) -> list:
        """This rank's share; every rank gets the same count so that DDP steps stay in lockstep."""
        if self.world == 1:
            return items
        n = max(1, len(items) // self.world)  # fewer slides than ranks: some ranks repeat a slide
        return [items[(self.rank + i * self.world) % len(items)] for i in range(n)]
