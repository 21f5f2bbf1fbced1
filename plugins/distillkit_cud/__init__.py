"""Catch-Up Distillation (Shao et al., arXiv 2305.10769), stage 1: catch-up training from scratch.

Written from the math of the project's METHODS.md §2.3-2.8; see ``loss.py`` for the objective.
"""

from __future__ import annotations

from distillkit import hookimpl

from .method import PAPER_RK3, CatchUpDistillation

__all__ = ["PAPER_RK3", "CatchUpDistillation"]


@hookimpl
def distillkit_register_methods(register):
    register(CatchUpDistillation)

