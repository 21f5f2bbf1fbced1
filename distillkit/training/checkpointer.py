"""Writing a run's checkpoints: atomically, linked as the latest, pruned, logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig
from ..tracking import Tracker
from .checkpoint import FORMAT, VERSION, save_checkpoint
from .distributed import Distributed
from .program import TrainingState
from .state import EpochBatches, capture_rng, link_latest, prune, step_file

LATEST = "checkpoint.pt"


class Checkpointer:
    """``save(step)``: rank 0 writes ``checkpoints/step-N.pt`` and makes ``checkpoint.pt`` the same
    file; every rank contributes its RNG state and data position."""

    def __init__(self, output_dir: Path, cfg: TrainConfig, distributed: Distributed, tracker: Tracker,
                 header: Callable[[], dict[str, Any]]):
        self.output_dir, self.cfg, self.distributed, self.tracker = output_dir, cfg, distributed, tracker
        self.header = header  # format, config, data spec, run id: what does not change during a run

    @property
    def latest(self) -> Path:
        return self.output_dir / LATEST

    def last_good(self) -> str:
        """The latest checkpoint on disk, for error messages."""
        return str(self.latest) if self.latest.exists() else "none (no checkpoint was written yet)"

    def remove_leftovers(self) -> None:
        """Temporary files of writes a crash interrupted: the files they would have replaced are intact."""
        for leftover in [*(self.output_dir / "checkpoints").glob(".*.tmp"), *self.output_dir.glob(".checkpoint.pt.*")]:
            leftover.unlink(missing_ok=True)

    def save(self, state: TrainingState, batches: EpochBatches) -> Path:
        rng_states = self.distributed.gather(capture_rng())
        data_states = self.distributed.gather(batches.state_dict())
        if self.distributed.is_main:
            step, cfg = state.step, self.cfg
            payload = {"format": FORMAT, "version": VERSION, **self.header(),
                       "images_seen": step * cfg.batch_size, "world_size": self.distributed.world_size,
                       **state.state_dict(), "rng": rng_states, "data": data_states}
            history = self.output_dir / "checkpoints"
            written = save_checkpoint(payload, step_file(history, step), cfg.checkpoint_format)
            link_latest(written, self.latest)
            prune(history, cfg.keep_last, cfg.keep_every)
            self.tracker.log_artifact(self.latest, "checkpoints")
            if cfg.keep_every and step % cfg.keep_every == 0:
                self.tracker.log_artifact(written, "checkpoints/history")
        self.distributed.barrier()
        return self.latest
