"""Nothing lost by default: checkpoints by the clock, and one written when the run is stopped.

``CheckpointClock``: a checkpoint is due every ``train.checkpoint_minutes`` of training (next to the
step-based ``train.checkpoint_every``), so a crash or a kill loses at most that much work.
``StopRequests``: while the training loop runs, SIGINT (Ctrl-C) and SIGTERM (a scheduler's
pre-emption, ``kill``) do not tear the process down mid-step: the loop finishes the step it is
in, checkpoints at that step boundary (so the resume stays exact) and raises ``TrainingInterrupted``.
A second signal interrupts at once. Under DDP the trainer agrees on both decisions across ranks
(``distributed.StepAgreement``, one step late so that no step waits for it), so every rank
checkpoints and stops at the same step.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Optional

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """The run was stopped (a signal, Ctrl-C); ``str()`` says what was saved and how to resume.
    ``exit_code``: 128 + the signal number, as a shell reports a process the signal ended.
    ``tracked``: whether the resume command should track the run (``launch`` sets it)."""

    def __init__(self, cause: str, step: Optional[int], max_steps: int, checkpoint: Optional[Path], saved_step: Optional[int],
                 exit_code: int = 130):
        super().__init__(cause)
        self.cause, self.step, self.max_steps = cause, step, max_steps
        self.checkpoint, self.saved_step, self.exit_code = checkpoint, saved_step, exit_code
        self.tracked = True

    def __str__(self) -> str:
        return interrupted_message(self.cause, self.step, self.max_steps, self.checkpoint, self.saved_step,
                                   self.tracked)


class CheckpointClock:
    """Due once ``minutes`` of training have passed since the start or the last checkpoint
    (never when ``minutes`` is 0). It says so once per interval: under ``torchrun`` the checkpoint
    it asks for is written a step later (``StepAgreement``), and asking again at that step would
    write a second one."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.reported = False

    def due(self) -> bool:
        if self.reported or self.seconds <= 0 or time.monotonic() - self.since < self.seconds:
            return False
        self.reported = True
        return True


class StopRequests:
    """A context in which the first SIGINT/SIGTERM is recorded (``signal_name``) instead of
    interrupting; a second one raises ``KeyboardInterrupt`` at once. Outside the main thread
    (where Python cannot install handlers) it records nothing and signals act as usual."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "SIGINT"

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for number in _STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def resume_command(checkpoint: Path, tracked: bool, environ: Optional[dict] = None) -> str:
    """The command that continues the run saved in ``checkpoint``, quoted for a POSIX shell (the
    checkpoint holds the run's whole config, its runs directory and tracking URI included). A
    run under ``torchrun`` (its ``WORLD_SIZE`` > 1) is resumed under torchrun on as many processes:
    one machine's launch is spelled out; several machines' need the user's own rendezvous options."""
    environ = os.environ if environ is None else environ
    words = ["run", "--resume", str(checkpoint)] + ([] if tracked else ["--no-track"])
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return shlex.join(["distillkit", *words])
    local = int(environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    if local == world:
        return shlex.join(["torchrun", "--standalone", f"--nproc-per-node={world}", "-m", "distillkit.cli.main", *words])
    return ("torchrun with the run's own launch options (" + f"{world // local} machines x {local} processes) "
            + shlex.join(["-m", "distillkit.cli.main", *words]))


def interrupted_message(cause: str, step: Optional[int], max_steps: int, checkpoint: Optional[Path], saved_step: Optional[int],
                        tracked: bool) -> str:
    """One line: what stopped the run, what was saved, how to resume."""
    head = f"interrupted by {cause}" + (f" at step {step}/{max_steps}" if step is not None else "")
    if checkpoint is None:
        return f"{head}; nothing was saved (no checkpoint had been written yet)"
    return (f"{head}; saved checkpoint {checkpoint} (step {saved_step}); resume with: "
            f"{resume_command(checkpoint, tracked)}")


def interrupted_on_disk(output_dir: Path, max_steps: int) -> TrainingInterrupted:
    """A Ctrl-C that did not wait for a step boundary (a second one, or one during set-up or the
    evaluation): what the run folder holds is what was saved."""
    latest = output_dir / "checkpoint.pt"
    steps = [int(m.group(1)) for p in (output_dir / "checkpoints").glob("step-*.pt")
             if (m := re.match(r"^step-(\d+)\.pt$", p.name))]
    if not latest.is_file() or not steps:
        return TrainingInterrupted("Ctrl-C", None, max_steps, None, None)
    return TrainingInterrupted("Ctrl-C", None, max_steps, latest, max(steps))
