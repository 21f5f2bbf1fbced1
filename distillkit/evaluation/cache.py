"""Where distillkit keeps what it computes once (FID statistics, classifiers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DISTILLKIT_CACHE``, else ``~/.cache/distillkit``."""
    return Path(os.environ.get("DISTILLKIT_CACHE") or "~/.cache/distillkit").expanduser()
