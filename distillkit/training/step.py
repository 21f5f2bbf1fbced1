"""One optimizer step: the updates of the method's plan, each over the step's micro-batches.

The device is waited for once per step: every update's loss, gradient norm and tensor metrics are
stacked and read back together (``.tolist()``), after the last update's backward pass and before
its optimizer step, so that a non-finite last update can still be skipped. Earlier updates of a
multi-update step must step before the next update's loss (which sees their result), so:

- ``nonfinite=stop``: they step at once and are checked with the rest in the one wait; a
  non-finite update stops the run, whose last checkpoint is untouched;
- ``nonfinite=skip``: each of them is read back before it steps (one more wait per update), so
  that a non-finite one is skipped and nothing it would have changed is.

The weights themselves are checked too: after a step's updates the largest |weight| of every
network and EMA is computed on the device (``weights_magnitude``) and read back in the next
step's wait (the trainer reads it at once before a checkpoint and at the end: ``check_weights``).
Non-finite weights stop the run under either setting: nothing can skip an update already applied.

With the check on the device (``train.nonfinite_check``: ``state.check_on_device``) the step does
not wait at all. Each update computes a found-inf flag on the device (loss or gradient norm not
finite) and hands it to its fused Adam, which then changes no weight, moment or step count; the
step's values and flags are copied to the host without blocking and read during the next step,
after that step's first backward pass (``_settle``), or at once where the trainer needs them
(logging, sample grids, checkpoints, the end). What a skipped step must not do on the host (the
schedules, the EMAs: ``_finish``) waits for that read under ``nonfinite=skip``: the weights do not
change in between, so the results are those of the host check; under ``nonfinite=stop`` it runs at
once, since a bad step ends the run before anything is saved. The weights check then rides on the
read one step later still.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional

import attrs
import torch

from ..config import TrainConfig
from ..contracts import Batch, Update
from ..errors import TrainingFailed
from .distributed import Distributed
from .host_copy import HostCopy
from .program import TrainingState


def micro_batch_seed(seed: int, step: int, micro: int, update: int = 0) -> int:
    """The loss generator's seed for one micro-batch of one update: a pure function of (seed,
    step, micro, update), so resuming needs no generator state and a DDP rank draws what the same
    chunk draws in one process. Update 0 keeps the seeds of single-update training."""
    return (seed * 0x9E3779B1 + step * 1_000_003 + micro * 7_919 + update * 0x2545F4914F6CDD1D) % (2**63 - 1)


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def chunk(batch: Batch, index: int, count: int) -> Batch:
    """Micro-batch ``index`` of ``count``, interleaved (rows index, index + count, ...): the rows a
    DDP rank would get from the distributed sampler, so accumulation in one process and DDP agree."""
    if count == 1:
        return batch

    def take(value):
        return None if value is None else value[index::count]

    return Batch(batch.x[index::count], take(batch.cond), take(batch.noise))


@attrs.frozen
class StepSetup:
    """What every step of a run shares."""

    cfg: TrainConfig
    seed: int
    device: torch.device
    distributed: Distributed
    generator: torch.Generator
    #: log ``<loss name>/loss`` etc. per update (several networks or a plan of its own) instead
    #: of the single-network keys ``loss``, ``grad_norm``.
    per_update_keys: bool = False


@attrs.define
class UpdateOutcome:
    """One update's results; ``values`` once read back from the device."""

    index: int
    update: Update
    loss: torch.Tensor
    grad_norm: torch.Tensor
    device_metrics: dict
    host_metrics: dict
    values: Optional[list] = None  # [loss, grad_norm, *device metrics] as Python floats
    applied: bool = False
    found_inf: Optional[torch.Tensor] = None  # device-side check: 1.0 when the loss or gradient is not finite

    def tensors(self) -> list[torch.Tensor]:
        """What ``values`` is read from, as 0-dim float32 tensors on the loss's device."""
        here = self.loss.device
        return [self.loss, self.grad_norm.detach().float().to(here), *(v.to(here) for v in self.device_metrics.values())]

    @property
    def loss_value(self) -> float:
        return self.values[0]

    @property
    def grad_norm_value(self) -> float:
        return self.values[1]

    def metrics(self) -> dict[str, float]:
        metrics = dict(self.host_metrics)
        metrics.update(zip(self.device_metrics, self.values[2:]))
        metrics["loss"] = self.loss_value
        metrics["grad_norm"] = self.grad_norm_value
        return metrics


@attrs.define
class PendingStep:
    """A step whose values and flags are on their way to the host (device-side check)."""

    done: int
    outcomes: list
    #: (step, largest |weight|) of an earlier step, read with these values
    weights: Optional[tuple[int, torch.Tensor]]
    values: HostCopy


@attrs.frozen
class StepResult:
    #: (key, value) pairs for the metric window (a key may appear for several updates)
    metrics: list
    #: the loss of the step's last applied update of the sampling network (None: none)
    sampling_loss: Optional[float]
    applied: bool


def _backward(setup: StepSetup, state: TrainingState, update: Update, index: int, batch: Batch,
              step: int) -> UpdateOutcome:
    """Forward and backward of one update over the micro-batches, then the unscaled, clipped
    gradient norm of its networks (one pass gives the norm, the clipping and the fault check)."""
    cfg, world, rank = setup.cfg, setup.distributed.world_size, setup.distributed.rank
    updated = [state.networks[name] for name in update.networks]
    if len(state.networks) > 1:
        for network in state.networks.values():
            network.set_trainable(network.name in update.networks)
    for network in updated:
        network.optimizer.zero_grad(set_to_none=True)
    view = {name: (network.model if name in update.networks else network.module)
            for name, network in state.networks.items()}
    accumulate = cfg.grad_accumulation
    losses: list[torch.Tensor] = []
    device_metrics: dict[str, list[torch.Tensor]] = {}
    host_metrics: dict[str, float] = {}
    for micro in range(accumulate):
        setup.generator.manual_seed(micro_batch_seed(setup.seed, step, micro * world + rank, index))
        with contextlib.ExitStack() as sync:
            if setup.distributed.enabled and micro < accumulate - 1:
                for network in updated:
                    if network.ddp is not None:
                        sync.enter_context(network.ddp.no_sync())
            with autocast(setup.device, cfg.precision):
                output = state.method.update_loss(view, update, chunk(batch, micro, accumulate), setup.generator, step)
            state.scaler.scale(output.loss / accumulate).backward()
        losses.append(output.loss.detach().float())
        for key, value in output.metrics.items():
            if isinstance(value, torch.Tensor):  # read back with the loss, in the step's one wait
                device_metrics.setdefault(key, []).append(value.detach().float().reshape(()))
            else:
                host_metrics[key] = host_metrics.get(key, 0.0) + float(value) / accumulate
    norms = []
    for network in updated:
        state.scaler.unscale_(network.optimizer)
        clip = network.config.grad_clip
        norms.append(torch.nn.utils.clip_grad_norm_(network.parameters, clip if clip > 0 else float("inf")))
    here = losses[0].device
    grad_norm = norms[0] if len(norms) == 1 else torch.stack([n.float().to(here) for n in norms]).square().sum().sqrt()
    return UpdateOutcome(index, update, sum(losses) / accumulate, grad_norm,
                         {k: sum(v) / accumulate for k, v in device_metrics.items()}, host_metrics)


def weights_magnitude(state: TrainingState) -> torch.Tensor:
    """The largest |weight| over every network and EMA, on the device (no wait): finite exactly
    when every weight is (NaN and inf propagate through both paths)."""
    tensors = state.weight_tensors()
    if tensors and tensors[0].device.type == "cpu":
        return largest_magnitude_on_cpu(tensors)
    # One fused pass on an accelerator: get_total_norm with the max norm.
    return torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)


def largest_magnitude_on_cpu(tensors: list[torch.Tensor], chunk_elements: int = 1 << 22) -> torch.Tensor:
    """max |x| over ``tensors``, as float32. On a CPU, get_total_norm loops over the tensors one
    small call each (about 1 ms for the digits U-Net and its EMA, 1-4 % of a step); one
    concatenation per chunk of up to ``chunk_elements`` values is about 5x cheaper, and the chunks
    bound the temporary copy."""
    maxima, group, size = [], [], 0
    for tensor in tensors:
        group.append(tensor.reshape(-1))
        size += tensor.numel()
        if size >= chunk_elements:
            maxima.append(torch.cat(group).abs().amax().float())
            group, size = [], 0
    if group:
        maxima.append(torch.cat(group).abs().amax().float())
    return torch.stack(maxima).amax()


def weights_failure(step: int, magnitude: float, checkpoint: str) -> TrainingFailed:
    return TrainingFailed(f"non-finite weights after the update of step {step} (largest |weight| {magnitude}); "
                          f"the last good checkpoint is {checkpoint}; lower the learning rate or clip the gradient "
                          f"harder (train.grad_clip)")


def check_weights(state: TrainingState, checkpoint: Callable[[], str]) -> None:
    """Read the pending weights check now (before a checkpoint, at the end of training)."""
    if state.pending_step is not None:  # the trainer settles such a step first (run_step's settle)
        raise RuntimeError(f"step {state.pending_step.done} would be saved before its non-finite check was read")
    if state.pending_weights is not None:
        step, magnitude = state.pending_weights
        state.pending_weights = None
        value = float(magnitude)
        if not math.isfinite(value):
            raise weights_failure(step, value, checkpoint())


def _read_back(outcomes: list[UpdateOutcome], state: Optional[TrainingState] = None,
               checkpoint: Callable[[], str] = str) -> None:
    """One wait for the device: every value not yet read, stacked into one tensor, with the
    previous step's weights check (``state.pending_weights``), which fails first: a non-finite
    loss after non-finite weights is a consequence, not the cause."""
    pending = [o for o in outcomes if o.values is None]
    if not pending:
        return
    here = pending[0].loss.device
    rows = [o.tensors() for o in pending]
    weights = state.pending_weights if state is not None else None
    extra = [weights[1].detach().float().to(here)] if weights is not None else []
    flat = torch.stack([value for row in rows for value in row] + extra).tolist()
    if weights is not None:
        state.pending_weights = None
        if not math.isfinite(flat[-1]):
            raise weights_failure(weights[0], flat[-1], checkpoint())
    for outcome, row in zip(pending, rows):
        outcome.values, flat = flat[:len(row)], flat[len(row):]


def _finite(outcome: UpdateOutcome, precision: str) -> bool:
    # Under fp16 an overflowing gradient is the loss scaler's business (it skips the step).
    return math.isfinite(outcome.loss_value) and (precision == "fp16" or math.isfinite(outcome.grad_norm_value))


def _stop(outcome: UpdateOutcome, done: int, checkpoint: str, per_update: bool) -> TrainingFailed:
    what = "loss" if not math.isfinite(outcome.loss_value) else "gradient"
    where = f" in update {outcome.index} ({outcome.update.loss})" if per_update else ""
    return TrainingFailed(
        f"non-finite {what}{where} at step {done} (loss {outcome.loss_value}, gradient norm "
        f"{outcome.grad_norm_value}); the last good checkpoint is {checkpoint}; set train.nonfinite=skip to skip such "
        + ("updates" if per_update else "steps")
    )


def _apply(state: TrainingState, outcome: UpdateOutcome) -> None:
    for name in outcome.update.networks:
        state.scaler.step(state.networks[name].optimizer)
    state.scaler.update()
    outcome.applied = True


def _count_skip(state: TrainingState, done: int) -> None:
    state.skipped += 1
    if not state.skipped_at or state.skipped_at[-1] != done:
        state.skipped_at.append(done)


def _skip(state: TrainingState, outcome: UpdateOutcome, done: int) -> None:
    _count_skip(state, done)
    for name in outcome.update.networks:
        state.networks[name].optimizer.zero_grad(set_to_none=True)


def run_step(setup: StepSetup, state: TrainingState, batch: Batch, step: int, *,
             before_wait: Callable[[], None], checkpoint: Callable[[], str], settle: bool = True) -> list[StepResult]:
    """Optimizer step ``step`` (0-based): the method's updates, then, if any was applied, the
    schedules, the EMAs and ``after_step``. ``before_wait`` runs just before the step's wait for
    the device (the trainer collates the next batch there); ``checkpoint()`` names the last good
    checkpoint for the error a non-finite update raises under ``nonfinite=stop``.

    Returns the results of the steps checked now: this one with the host check; with the device
    check the previous step's (if any), and this one's too when ``settle`` (read it at once)."""
    if state.check_on_device:
        return _run_flagged(setup, state, batch, step, before_wait, checkpoint, settle)
    return [_run_checked(setup, state, batch, step, before_wait, checkpoint)]


def _run_checked(setup: StepSetup, state: TrainingState, batch: Batch, step: int,
                 before_wait: Callable[[], None], checkpoint: Callable[[], str]) -> StepResult:
    """``run_step`` with the host check: the values are read before the last update steps."""
    cfg, done = setup.cfg, step + 1
    plan = state.method.update_plan(step)
    outcomes: list[UpdateOutcome] = []
    for index, update in enumerate(plan):
        outcome = _backward(setup, state, update, index, batch, step)
        outcomes.append(outcome)
        last = index == len(plan) - 1
        if last:
            before_wait()
            _read_back(outcomes, state, checkpoint)
            if cfg.nonfinite == "stop":
                for earlier in outcomes:
                    if not _finite(earlier, cfg.precision):
                        raise _stop(earlier, done, checkpoint(), setup.per_update_keys)
        elif cfg.nonfinite == "skip":
            _read_back([outcome], state, checkpoint)
        else:
            _apply(state, outcome)  # checked in the step's one wait, with the others
            continue
        if _finite(outcome, cfg.precision):
            _apply(state, outcome)
        else:
            _skip(state, outcome, done)
    _all_trainable(state)
    applied = any(o.applied for o in outcomes)
    if applied:
        _finish(state, step)
    state.step = done
    return StepResult(_metrics(setup, outcomes), _sampling_loss(state, outcomes), applied)


def _all_trainable(state: TrainingState) -> None:
    if len(state.networks) > 1:
        for network in state.networks.values():
            network.set_trainable(True)


def _finish(state: TrainingState, step: int) -> None:
    """What follows a step with an applied update: the schedules, the EMAs, ``after_step``."""
    for network in state.networks.values():
        _schedule_step(network, several=len(state.networks) > 1)
    for network in state.networks.values():
        for ema in network.emas.values():
            ema.update_parameters(network.module)
    state.method.after_step(state.student.module, step)
    # Checked in a later read (or before the next checkpoint): the updates of this step may have
    # made a weight non-finite even with a finite loss and gradient.
    state.pending_weights = (step + 1, weights_magnitude(state))


# the device-side check ----------------------------------------------------------------------------

def _run_flagged(setup: StepSetup, state: TrainingState, batch: Batch, step: int, before_wait: Callable[[], None],
                 checkpoint: Callable[[], str], settle: bool) -> list[StepResult]:
    """``run_step`` with the device check: every update steps under its found-inf flag; the
    previous step is checked after this one's first backward pass is queued."""
    results: list[StepResult] = []
    outcomes: list[UpdateOutcome] = []
    for index, update in enumerate(state.method.update_plan(step)):
        outcome = _backward(setup, state, update, index, batch, step)
        outcome.found_inf = (~(torch.isfinite(outcome.loss) & torch.isfinite(outcome.grad_norm))).float()
        outcomes.append(outcome)
        if index == 0:
            before_wait()
            results += _settle(setup, state, checkpoint)
        _apply_flagged(state, outcome)
    _all_trainable(state)
    state.pending_step = _send_to_host(state, step + 1, outcomes)
    if setup.cfg.nonfinite == "stop":
        _finish(state, step)
    state.step = step + 1
    return results + (_settle(setup, state, checkpoint) if settle else [])


def _apply_flagged(state: TrainingState, outcome: UpdateOutcome) -> None:
    """The update's optimizer steps, which the fused kernels skip on the device when flagged
    (what ``GradScaler.step`` does for them)."""
    for name in outcome.update.networks:
        optimizer = state.networks[name].optimizer
        optimizer.found_inf, optimizer.grad_scale = outcome.found_inf, None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale


def _send_to_host(state: TrainingState, done: int, outcomes: list[UpdateOutcome]) -> PendingStep:
    """Every update's values and flag, and the pending weights check, stacked and copied to the
    host without waiting (into pinned memory on CUDA, with an event that says when it is there)."""
    weights, state.pending_weights = state.pending_weights, None
    values = [v for o in outcomes for v in (*o.tensors(), o.found_inf)]
    if weights is not None:
        values.append(weights[1].detach().float().to(values[0].device))
    return PendingStep(done, outcomes, weights, HostCopy(torch.stack(values)))


def _settle(setup: StepSetup, state: TrainingState, checkpoint: Callable[[], str]) -> list[StepResult]:
    """Read and check the pending step (if any): the weights check it carries fails first, then a
    non-finite update stops the run (``stop``) or is counted as skipped (``skip``), whose
    ``_finish`` runs now if any update was applied."""
    pending, state.pending_step = state.pending_step, None
    if pending is None:
        return []
    flat = pending.values.tolist()
    if pending.weights is not None and not math.isfinite(flat[-1]):
        raise weights_failure(pending.weights[0], flat[-1], checkpoint())
    for outcome in pending.outcomes:  # the flag, not the values, says what the device did
        width = len(outcome.device_metrics) + 2
        outcome.values, outcome.applied, flat = flat[:width], flat[width] == 0.0, flat[width + 1:]
    bad = [o for o in pending.outcomes if not o.applied]
    if bad and setup.cfg.nonfinite == "stop":
        raise _stop(bad[0], pending.done, checkpoint(), setup.per_update_keys)
    for _ in bad:
        _count_skip(state, pending.done)
    applied = len(bad) < len(pending.outcomes)
    if applied and setup.cfg.nonfinite == "skip":
        _finish(state, pending.done - 1)
    return [StepResult(_metrics(setup, pending.outcomes), _sampling_loss(state, pending.outcomes), applied)]


def _schedule_step(network, several: bool) -> None:
    """Every network's schedule follows the training step, also through the steps before its first
    update, where torch warns that the schedule steps before its optimizer has."""
    if not several:
        network.scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        network.scheduler.step()


def _metrics(setup: StepSetup, outcomes: list[UpdateOutcome]) -> list[tuple[str, float]]:
    """What the applied updates log (a skipped update contributes nothing to the averages)."""
    pairs = []
    for outcome in outcomes:
        if not outcome.applied:
            continue
        prefix = f"{outcome.update.loss}/" if setup.per_update_keys else ""
        pairs.extend((f"{prefix}{key}", value) for key, value in outcome.metrics().items())
    return pairs


def _sampling_loss(state: TrainingState, outcomes: list[UpdateOutcome]) -> Optional[float]:
    for outcome in reversed(outcomes):
        if outcome.applied and state.sampling in outcome.update.networks:
            return outcome.loss_value
    return None
