"""What a checkpoint holds beyond weights: RNG states, the data position, retention of old files."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ..contracts import Batch

_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


def capture_rng() -> dict[str, Any]:
    """Every global random state a training step may draw from (dropout uses torch's)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as plain types: weights_only loading refuses numpy arrays.
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """random.setstate needs tuples where a round trip may have produced lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


class EpochBatches:
    """Endless batches, epoch after epoch, with a resumable position.

    The sampler reshuffles per epoch from (seed, epoch); the loader's own state records how far
    into the epoch it got, so a resumed run sees exactly the batches the uninterrupted run would.
    """

    def __init__(self, loader: StatefulDataLoader, sampler) -> None:
        self.loader = loader
        self.sampler = sampler
        self.epoch = 0
        self._iterator: Optional[Iterator] = None

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> Batch:
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(self.epoch)
                self._iterator = iter(self.loader)
            try:
                return Batch.from_item(next(self._iterator))
            except StopIteration:
                self.epoch += 1
                self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.sampler.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._iterator = None


def step_file(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def link_latest(source: Path, latest: Path) -> None:
    """Make ``latest`` the same file as ``source`` atomically (hard link + rename, no second write)."""
    temporary = latest.with_name(f".{latest.name}.link")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:  # file systems without hard links: copy instead
        import shutil

        shutil.copyfile(source, temporary)
    os.replace(temporary, latest)


def prune(directory: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete step checkpoints beyond the newest ``keep_last``, except multiples of ``keep_every``."""
    steps = sorted(
        (int(m.group(1)), path) for path in directory.glob("step-*.pt") if (m := _STEP_FILE.match(path.name))
    )
    removed = []
    for step, path in steps[:-keep_last] if keep_last else steps:
        if keep_every and step % keep_every == 0:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
