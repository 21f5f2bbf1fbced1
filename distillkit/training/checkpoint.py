"""Checkpoints: plain ``torch.save`` dicts, written atomically, read with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

FORMAT = "distillkit-checkpoint"
VERSION = 1


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """Write to a temporary file in the same directory, flush it to disk, then rename over ``path``.

    A crash in the middle leaves the previous file at ``path`` untouched (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


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
