"""Starting a student network from its teacher's weights (when the teacher has a network of the
same shapes: a checkpoint or run teacher; analytic teachers have none)."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


def teacher_network(teacher: Any) -> Optional[nn.Module]:
    """The network behind a checkpoint / run teacher (``teacher.trained.model``), else None."""
    return getattr(getattr(teacher, "trained", None), "model", None)


def _same_shapes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def copy_teacher_weights(target: nn.Module, teacher: Any) -> str:
    """Load the teacher network's weights into ``target`` when their state dicts have the same
    keys and shapes, else its ``backbone``'s (the trunk and main head of a multi-head student,
    e.g. CUD's). Returns what was copied: ``teacher``, ``teacher-backbone`` or ``random``."""
    source = teacher_network(teacher)
    if source is None:
        return "random"
    wanted = target.state_dict()
    for label, module in (("teacher", source), ("teacher-backbone", getattr(source, "backbone", None))):
        if isinstance(module, nn.Module) and _same_shapes(module.state_dict(), wanted):
            target.load_state_dict(module.state_dict())
            return label
    return "random"
