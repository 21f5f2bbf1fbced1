"""One process or many: the same trainer under ``torchrun`` with DDP.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with ``WORLD_SIZE`` > 1 the trainer
joins a process group (NCCL on CUDA, gloo on CPU), shards the data with a stateful distributed
sampler, averages gradients through DDP and metrics through all-reduce; only rank 0 talks to MLflow
and writes files.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import attrs
import torch
import torch.distributed as dist

from .host_copy import HostCopy


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


class StepAgreement:
    """Decisions every rank must take at the same step ("checkpoint now", "stop now"), true on
    every rank when true on any, without a wait for the device in the step.

    Under ``torchrun`` the flags a rank raises at step k are all-reduced (max) without blocking
    and acted on by every rank at step k + 1: reading the result at once would make the host wait
    for the previous step's kernels (NCCL orders the collective after them), a gap in every
    step. On CUDA the result is copied without blocking into pinned memory, with an event, right
    behind the collective, so that reading it a step later waits for nothing. In one process the
    flags are acted on at once, as there is nothing to agree on."""

    def __init__(self, distributed: Distributed, device: torch.device, size: int):
        self.distributed, self.device, self.size = distributed, device, size
        self._pending: Optional[tuple[Any, HostCopy]] = None  # (collective still to wait for, its result)

    def exchange(self, flags: list[bool]) -> list[bool]:
        """This step's flags in; out, the flags to act on now: those agreed at the previous
        exchange under ``torchrun`` (all false the first time), these ones in one process."""
        if not self.distributed.enabled:
            return list(flags)
        agreed = self._collect() if self._pending is not None else [False] * self.size
        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32).to(self.device, non_blocking=True)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # on CUDA: the current stream waits for the collective; the host does not
            work = None  # so the copy queued next is the reduced result
        self._pending = (work, HostCopy(tensor))
        return agreed

    def close(self) -> None:
        """Wait for the last exchange, whose answer no step will act on (the run is over): no
        collective is left in flight when the process group is torn down."""
        if self._pending is not None:
            self._collect()

    def _collect(self) -> list[bool]:
        work, result = self._pending
        self._pending = None
        if work is not None:  # gloo: the all-reduce writes the CPU tensor itself
            work.wait()
        return [bool(v) for v in result.tolist()]
