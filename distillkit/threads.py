"""The CPU thread count of a ``distillkit`` command whose user chose none: one core left spare.

torch's own default is one intra-op thread per core, and its OpenMP threads spin while they wait
for each other. When another process holds one of the cores, the thread that waits for it stalls
every parallel op of the team. Measured on an idle 2-core machine with the main job
(docs/results/main-job-threads-cpu.md): beside one busy process, torch's two threads took 186 s
against 91 s for one thread; on the idle machine one thread cost a third (79 s against 60 s). A
team one core short of the machine does not wait for the core that one other busy thread holds.

The count depends on the machine only, never on its load, so the same command on the same machine
trains the same floats (the thread count changes them in their last bits). ``OMP_NUM_THREADS``
or ``MKL_NUM_THREADS`` (torchrun sets the first when it starts several workers) always wins.
Only the command line applies this: the Python API leaves a notebook's process-wide setting alone.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

#: Environment variables through which a user (or a launcher) has already chosen the count.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_torch_default: Optional[int] = None  # torch's count before the first change, one per core


def spare_core_threads(torch_default: int, environ: Mapping[str, str]) -> Optional[int]:
    """The count to set, or None where the environment already chose one."""
    if any(environ.get(name, "").strip() for name in THREAD_VARIABLES):
        return None
    return max(1, torch_default - 1)


def leave_a_core_spare(environ: Mapping[str, str] = os.environ) -> int:
    """Apply :func:`spare_core_threads` to this process (the same count however often it is
    called) and return the count torch now uses."""
    import torch

    global _torch_default
    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    chosen = spare_core_threads(_torch_default, environ)
    if chosen is not None and chosen != torch.get_num_threads():
        torch.set_num_threads(chosen)
    return torch.get_num_threads()
