"""Catch-Up Distillation (Shao et al., arXiv 2305.10769).

* ``cud``: stage 1, catch-up training from scratch (METHODS.md §2; ``loss.py``, ``method.py``);
* ``cud-stage2``: stage 2, one-step distillation of a stage-1 run (§3; ``stage2.py``);
* the paper's samplers as pure functions (§4; ``sampling.py``).

Written from the math of the project's METHODS.md, not from the (unlicensed) official code.
"""

from __future__ import annotations

from distillkit import hookimpl

from .method import PAPER_RK3, CatchUpDistillation, CUDConfig
from .sampling import CUDHeunSampler, euler_sample, heun_sample, one_step_sample
from .stage2 import CUDStage2, CUDStage2Config

__all__ = [
    "PAPER_RK3",
    "CUDConfig",
    "CUDHeunSampler",
    "CUDStage2",
    "CUDStage2Config",
    "CatchUpDistillation",
    "euler_sample",
    "heun_sample",
    "one_step_sample",
]


@hookimpl
def distillkit_register_methods(register):
    register(CatchUpDistillation)
    register(CUDStage2)


@hookimpl
def distillkit_register_samplers(register):
    register(CUDHeunSampler)
