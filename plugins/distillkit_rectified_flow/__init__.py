"""Rectified flow baselines: ``rf-reflow`` (fine-tune on teacher-generated noise-sample pairs) and
``rf-distill`` (k-step distillation on those pairs), METHODS.md §8.2. 1-RF is the ``fm`` method.

Written from the paper's mathematics (Liu, Gong and Liu 2023); no RectifiedFlow code is used.
"""

from distillkit import hookimpl

from .method import DistillConfig, RectifiedDistillation, Reflow, ReflowConfig
from .pairs import PairDataset, generate_pairs, load_pairs

__all__ = ["DistillConfig", "PairDataset", "RectifiedDistillation", "Reflow", "ReflowConfig", "generate_pairs", "load_pairs"]


@hookimpl
def distillkit_register_methods(register):
    register(Reflow)
    register(RectifiedDistillation)
