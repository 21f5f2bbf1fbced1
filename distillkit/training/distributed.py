"""One process or many: the same trainer under ``torchrun`` with DDP.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE`` > 1 the trainer
joins a process group (NCCL on CUDA, gloo on CPU), shards the data with a stateful distributed
sampler, averages gradients through DDP and metrics through all-reduce; only rank 0 talks to MLflow
and writes files.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch
import torch.distributed as dist


@attrs.frozen
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Average scalars over ranks (every rank gets the result)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist())}

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Each flag true on every rank when it is true on any (one small all-reduce): decisions
        such as "checkpoint now" or "stop now" that every rank must take at the same step."""
        if not self.enabled:
            return list(flags)
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return [bool(v) for v in tensor.tolist()]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.enabled:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group when launched by torchrun; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        from .build import pick_device

        return Distributed(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(world, rank, local_rank), device


def teardown(distributed: Distributed) -> None:
    if distributed.enabled and dist.is_initialized():
        dist.destroy_process_group()
