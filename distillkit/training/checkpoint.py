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


#: what resuming a run reads from its checkpoint (``TrainingState.load_state_dict``, the RNG
#: states, the data positions); a version-1 checkpoint has ``optimizer``/``scheduler`` only.
RESUME_KEYS = ("config", "data_spec", "student", "ema_state", "scaler", "method", "step", "rng", "data")
#: what sampling, evaluating or distilling a trained model reads.
MODEL_KEYS = ("config", "data_spec", "step")


def require_keys(payload: dict[str, Any], path: str | Path, keys: tuple[str, ...], purpose: str) -> None:
    """A one-line ``UsageError`` when ``payload`` lacks one of ``keys`` (a truncated or foreign file
    that still says it is a distillkit checkpoint); ``RESUME_KEYS`` also need an optimizer and a
    schedule (under the name of either version)."""
    missing = [key for key in keys if key not in payload]
    if keys == RESUME_KEYS:
        missing += [old for old, new in (("optimizer", "optimizers"), ("scheduler", "schedulers"))
                    if old not in payload and new not in payload]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete: it has no {', '.join(repr(k) for k in missing)}, "
                         f"which {purpose} needs (is it a checkpoint distillkit wrote?)")
    if not isinstance(payload.get("config"), dict):
        raise UsageError(f"checkpoint {path} is incomplete: its 'config' is not a run configuration")
