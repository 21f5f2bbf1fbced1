"""What a run reports while it trains: averaged metrics every ``log_every`` steps, a progress bar."""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterable

import torch

from .distributed import Distributed


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


class MetricWindow:
    """Sums of the metrics logged since the last flush, each averaged over the steps (updates) it
    was reported in, and the images per second over the window."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.images_per_second = 0.0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, pairs: Iterable[tuple[str, float]]) -> None:
        """One step's metrics (a skipped step adds none, but still counts for the throughput)."""
        for key, value in pairs:
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.steps += 1

    def flush(self, distributed: Distributed, device: torch.device) -> dict[str, float]:
        """The window's averages over every rank, as ``train/<key>``, and a new window."""
        elapsed = time.perf_counter() - self.started
        self.images_per_second = self.steps * self.batch_size / max(elapsed, 1e-9)
        averaged = distributed.mean({k: v / self.counts[k] for k, v in self.sums.items()}, device)
        self._reset()
        return {f"train/{k}": v for k, v in averaged.items()}


class Progress:
    """A progress bar on a terminal; a log line every few percent anywhere else (CI logs, files)."""

    def __init__(self, total: int, start: int, enabled: bool, log_every: int):
        self.total, self.enabled = total, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.every = max(log_every, total // 20)
        self.started = time.perf_counter()
        self.start_step = start
        self.bar = None
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr)

    def update(self, step: int, loss: float, images_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")
            self.bar.update(1)
            return
        if self.enabled and (step % self.every == 0 or step == self.total):
            done = step - self.start_step
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  {images_per_second:,.0f} img/s  "
                  f"elapsed {elapsed:.0f}s  ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class RunEta:
    """One line, early in training, with the time the whole run should take.

    Training: the steps left at the rate of the steps after the first (which pays for warm-up),
    measured over at least ``MEASURED_STEPS`` steps and ``MEASURED_SECONDS`` seconds, because a
    shared machine's speed swings for seconds at a time. Evaluation: from the same rate per
    network call on one sample. A training step makes ``step_calls`` forward-equivalent calls (a
    backward pass counts as two) on ``batch_size`` samples; the evaluation makes
    ``eval_sample_calls`` calls on one sample each (samples x (the NFEs + the reference solve)),
    whatever batches it groups them in. A rough guide: metrics that run networks of their own
    (FID's Inception, the digits classifier) are not counted."""

    MEASURED_STEPS = 10
    MEASURED_SECONDS = 3.0

    def __init__(self, start: int, total: int, step_calls: float, batch_size: int, eval_sample_calls: float,
                 enabled: bool, log, clock=time.perf_counter):
        self.start, self.total = start, total
        self.step_sample_calls = max(step_calls, 1.0) * batch_size
        self.eval_sample_calls = eval_sample_calls
        self.enabled = enabled and total - start > 2
        self.log, self.clock = log, clock
        self.first_done: float = 0.0

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        if step == self.start + 1:
            self.first_done = self.clock()
            return
        measured = step - self.start - 1
        elapsed = self.clock() - self.first_done
        if step < self.total and (measured < self.MEASURED_STEPS or elapsed < self.MEASURED_SECONDS):
            return
        per_step = elapsed / measured
        training = per_step * (self.total - step)
        evaluation = per_step / self.step_sample_calls * self.eval_sample_calls
        self.log(f"distillkit: ETA {_duration(training + evaluation)} for the rest of the run: training "
                 f"~{_duration(training)} ({per_step * 1000:.0f} ms/step), evaluation ~{_duration(evaluation)}")
        self.enabled = False
