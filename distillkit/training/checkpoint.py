"""Checkpoints: plain ``torch.save`` dicts, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import save_atomic  # noqa: F401 - the one atomic save; the trainer imports it from here

FORMAT = "distillkit-checkpoint"
#: 2: several networks (``networks``, ``optimizers``, ``schedulers``, ...); version 1 is read too.
VERSION = 2


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a distillkit checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupted, or not a torch file
        raise UsageError(f"checkpoint {path} cannot be read ({type(exc).__name__}): is it truncated or corrupted?") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not a distillkit checkpoint")
    return payload
