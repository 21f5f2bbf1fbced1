"""A device tensor on its way to the host without a wait for the device."""

from __future__ import annotations

import torch


class HostCopy:
    """On CUDA: a non-blocking copy into pinned memory with an event recorded behind it, so that
    reading it later waits for that copy (and what was queued before it), not for the work queued
    since. Elsewhere: the tensor itself (nothing runs ahead of the host)."""

    def __init__(self, tensor: torch.Tensor):
        self.copied = None
        if tensor.device.type != "cuda":
            self.host = tensor
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def tolist(self) -> list:
        if self.copied is not None:
            self.copied.synchronize()  # the copy only: the device goes on with the work queued since
        return self.host.tolist()
