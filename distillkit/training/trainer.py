"""The trainer. It calls only the Method contract: no method is known by name.

One loop serves one process and ``torchrun`` with DDP alike, and one network or several: each
network has its own optimizer, schedule, clipping and EMAs (``program``), a step runs the updates
of the method's plan (``step``), and ``train`` below only wires the pieces together. Every random
number a step draws is either reseeded from (seed, step, micro-batch, update) — the loss
generator — or saved in the checkpoint — the global torch state that dropout uses, the data
position — so a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from ..config import flatten
from ..contracts import Batch, Dataset, Method, PrepareContext, Teacher
from ..errors import ConfigError, UsageError
from ..evaluation import Evaluation, class_labels, end_of_run, sample_grid, save_sample_figure
from ..evaluation.figures import save_png
from ..resolve import Resolved
from ..sampling import prior_noise
from ..trained import CONVENTION
from ..tracking import Tracker
from .build import Components, build_dataset, build_networks, count_parameters, describe
from .checkpointer import Checkpointer
from .distributed import Distributed, StepAgreement
from .program import TrainingState, build_state
from .progress import MetricWindow, Progress, RunEta, peak_memory_mb
from .state import EpochBatches, restore_rng
from .interruption import CheckpointClock, StopRequests, TrainingInterrupted
from .step import StepSetup, check_weights, micro_batch_seed, run_step  # noqa: F401  (micro_batch_seed: public)

# torchdata 0.11 calls a deprecated torch API on every loader; the warning means nothing to users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

_GRID_IMAGES = 16
FINISHED_MARKER = "finished.json"


@attrs.frozen
class RunResult:
    run_id: Optional[str]
    output_dir: Path
    checkpoint: Path
    sample_figure: Optional[Path]
    evaluation: Optional[Evaluation]
    final_loss: float
    images_per_second: float
    resumed_from_step: int = 0
    #: the steps whose updates ``train.nonfinite=skip`` skipped (1-based), over the whole run
    skipped_steps: tuple = ()


def _set_matmul_precision(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _local_batch(cfg, world: int) -> int:
    if cfg.batch_size % (world * cfg.grad_accumulation):
        raise ConfigError("train.batch_size", cfg.batch_size,
                          f"a multiple of processes x grad_accumulation = {world * cfg.grad_accumulation}")
    return cfg.batch_size // world


def _batches(data, cfg, seed: int, local_batch: int, distributed: Distributed, device: torch.device) -> EpochBatches:
    if len(data) // distributed.world_size < local_batch:
        raise ConfigError("train.batch_size", cfg.batch_size, f"at most {len(data)} for this training set")
    sampler = StatefulDistributedSampler(data, num_replicas=distributed.world_size, rank=distributed.rank,
                                         shuffle=True, seed=seed, drop_last=True)
    # The loader's own generator: a new epoch's iterator draws a worker seed from it, and drawing
    # from the global generator instead would shift dropout's random stream on resume.
    # Pinned batches on CUDA: the copy to the GPU does not wait for the previous step's kernels.
    loader = StatefulDataLoader(data, batch_size=local_batch, sampler=sampler, drop_last=True,
                                generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")
    return EpochBatches(loader, sampler)


def _per_update_keys(method: Method, state: TrainingState) -> bool:
    """Log per update (``train/<loss>/loss``) when the method has several networks or a plan of its own."""
    return len(state.networks) > 1 or type(method).update_plan is not Method.update_plan


def _log_start(resolved: Resolved, tracker: Tracker, parts: Components, state: TrainingState,
               teacher: Optional[Teacher]) -> None:
    """Params, tags and costs, logged once when a run starts (not again on resume)."""
    method = state.method
    evals = method.network_evals_per_step()
    tracker.log_params(flatten(resolved.to_dict()))
    tags = describe(resolved, parts)
    tags["distillkit.ema"] = ",".join(state.student.emas)
    tags["distillkit.nonfinite_check"] = "device" if state.check_on_device else "host"
    tags["distillkit.cpu_threads"] = str(torch.get_num_threads())  # it changes a CPU run's floats
    if len(state.networks) > 1:
        tags["distillkit.networks"] = ",".join(state.networks)
    if teacher is not None:
        tags["distillkit.teacher"] = teacher.identity
    tracker.set_tags(tags)
    metrics = {"cost/network_evals_with_grad": evals["with_grad"], "cost/network_evals_no_grad": evals["no_grad"],
               "cost/network_evals_jvp": evals.get("jvp", 0), "cost/network_evals_once": method.network_evals_once(),
               "model/parameters": count_parameters(state.student.module)}
    if len(state.networks) > 1:
        metrics.update({f"model/parameters/{n.name}": count_parameters(n.module) for n in state.networks.values()})
    tracker.log_metrics(metrics, step=0)


def _cpu_threads(device: torch.device) -> str:
    """The start line's " on N CPU threads" of a CPU run: the count changes its speed and its floats."""
    count = torch.get_num_threads()
    return f" on {count} CPU thread{'s' if count != 1 else ''}" if device.type == "cpu" else ""


def _start_line(resolved: Resolved, state: TrainingState, world: int, start_step: int,
                device: torch.device) -> str:
    config, cfg, method = resolved.config, resolved.config.train, state.method
    evals = method.network_evals_per_step()
    if len(state.networks) > 1:
        networks = ", ".join(f"{n.name} {count_parameters(n.module):,} ({n.config.optimizer}, lr {n.config.lr:g})"
                             for n in state.networks.values())
        size = f"networks {networks}; samples {state.sampling}"
    else:
        size = f"{count_parameters(state.student.module):,} parameters"
    once = method.network_evals_once()
    return (f"distillkit: {config.method} on {config.dataset} with {resolved.backbone_name} "
            f"({size}), {cfg.max_steps} steps of {cfg.batch_size}"
            f"{f' on {world} processes' if world > 1 else ''}"
            f"{_cpu_threads(device)}"
            f", {evals['with_grad']} forward+backward and "
            f"{evals['no_grad']} no-grad network evaluations"
            + (f" and {evals['jvp']} Jacobian-vector products" if evals.get("jvp") else "") + " per step"
            + (f" (plus {once:,} once, for the data it trains on)" if once else "")
            + (f"; resuming at step {start_step}" if start_step else ""))


def _sample_grid(resolved: Resolved, method: Method, weights: torch.nn.Module, spec, fixed_noise, fixed_labels,
                 output_dir: Path, tracker: Tracker, step: int) -> None:
    """Samples from the fixed noise at each ``train.sample_nfe`` with the run's sampler, saved and
    logged as one figure."""
    weights.eval()
    rows = sample_grid(method, weights, resolved, fixed_noise, fixed_labels, resolved.config.train.sample_nfe)
    path = save_sample_figure(rows, spec, output_dir / "grids" / f"step-{step:08d}.png")
    tracker.log_image(path, key="samples/train", step=step)


def _run_eta(resolved: Resolved, method: Method, start_step: int, enabled: bool, log) -> RunEta:
    from ..plugin_manager import get_registries

    sample, train = resolved.config.sample, resolved.config.train
    evals = method.network_evals_per_step()
    step_calls = 3 * evals["with_grad"] + evals["no_grad"] + 3 * evals.get("jvp", 0)
    reference = get_registries().integrators.get(sample.reference_integrator)
    stages = getattr(reference, "stages", 1)
    eval_sample_calls = sample.num_samples * (sum(sample.nfe) + sample.reference_steps * stages)
    return RunEta(start_step, train.max_steps, step_calls, train.batch_size, eval_sample_calls, enabled, log)


def _end_of_run_evaluation(resolved: Resolved, method: Method, weights: torch.nn.Module, dataset: Dataset,
                           device: torch.device, tracker: Tracker, output_dir: Path,
                           log: Optional[Callable[[str], None]] = None) -> tuple[Evaluation, Path]:
    """The quality of ``weights`` at every ``sample.nfe``, logged (a line per NFE on ``log``); the
    samples saved as the figure ``distillkit sample`` draws (labelled by NFE)."""
    config = resolved.config
    weights.eval()
    evaluation = end_of_run(method, weights, dataset, resolved, device, log=log)
    tracker.log_metrics(evaluation.metrics(), step=config.train.max_steps)
    figure = output_dir / "samples.png"
    save_png(evaluation.samples, dataset.spec, figure)
    tracker.log_artifact(figure, "samples")
    return evaluation, figure


class _FixedGridInputs:
    """The noise (and labels) every training-time sample grid starts from."""

    def __init__(self, resolved: Resolved, spec, device: torch.device):
        seed = resolved.config.sample.seed
        self.noise = prior_noise(_GRID_IMAGES, spec.shape, seed, device=device)
        self.labels = class_labels(_GRID_IMAGES, spec.num_classes, seed).to(device) if spec.num_classes else None


@attrs.define
class _Run:
    """What the loop of one run works with, built once (``_build_run``)."""

    resolved: Resolved
    parts: Components
    state: TrainingState
    setup: StepSetup
    checkpointer: Checkpointer
    batches: EpochBatches
    device: torch.device
    channels_last: bool

    @property
    def cfg(self):
        return self.resolved.config.train


def train(
    resolved: Resolved,
    tracker: Tracker,
    output_dir: Path,
    *,
    dataset: Optional[Dataset] = None,
    teacher: Optional[Teacher] = None,
    resume: Optional[dict[str, Any]] = None,
    distributed: Distributed = Distributed(),
    device: Optional[torch.device] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int], None]] = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> RunResult:
    """Train ``resolved``; ``resume`` is a checkpoint payload to continue from exactly.

    ``on_step(step)`` is called after each completed optimizer step and its checkpoint, if any
    (the crash tests raise from it).
    """
    from .build import pick_device

    device = device or pick_device(resolved.config.device)
    local_batch = _local_batch(resolved.config.train, distributed.world_size)  # before any work
    _set_matmul_precision(resolved.config.train.precision)
    dataset = dataset if dataset is not None else build_dataset(resolved)
    run = _build_run(resolved, tracker, output_dir, dataset, teacher, distributed, device, local_batch, progress)
    if resume is not None:
        _restore(run, resume, distributed.rank)
    start_step = run.state.step
    if start_step == 0:
        _log_start(resolved, tracker, run.parts, run.state, teacher)
    if distributed.is_main:
        log(_start_line(resolved, run.state, distributed.world_size, start_step, device))
    reporting = progress and distributed.is_main
    final_loss, images_per_second, checkpoint = _train_steps(run, tracker, output_dir, distributed, reporting,
                                                             on_step, log)
    if not distributed.is_main:
        return RunResult(tracker.run_id, output_dir, checkpoint, None, None, final_loss, images_per_second, start_step)
    evaluation, figure = _end_of_run_evaluation(resolved, run.parts.method, run.state.sampling_weights(), dataset,
                                                device, tracker, output_dir, log=log if progress else None)
    # Written last: a run without it (killed during the evaluation, say) is resumed by --resume auto.
    (output_dir / FINISHED_MARKER).write_text(json.dumps(evaluation.metrics(), indent=2))
    return RunResult(tracker.run_id, output_dir, checkpoint, figure, evaluation, final_loss, images_per_second, start_step,
                     skipped_steps=tuple(run.state.skipped_at))


def _build_run(resolved: Resolved, tracker: Tracker, output_dir: Path, dataset: Dataset, teacher: Optional[Teacher],
               distributed: Distributed, device: torch.device, local_batch: int, progress: bool) -> _Run:
    """The networks (prepared by their method), their training state, the data and the checkpointer."""
    config = resolved.config
    cfg = config.train
    spec = dataset.spec
    method, modules = build_networks(resolved, spec, device, seed=config.seed, teacher=teacher)
    channels_last = cfg.channels_last and spec.is_image
    if channels_last:
        modules = {name: module.to(memory_format=torch.channels_last) for name, module in modules.items()}
    student = modules[method.sampling_network]
    parts = Components(dataset=dataset, spec=spec, method=method, student=student, networks=modules)
    method.prepare(
        student,
        PrepareContext(device=device, dataset=dataset, output_dir=output_dir,
                       log_artifact=tracker.log_artifact, seed=config.seed, progress=progress and distributed.is_main),
    )
    batches = _batches(method.train_set(dataset), cfg, config.seed, local_batch, distributed, device)
    state = build_state(method, modules, cfg, distributed=distributed, device=device)
    setup = StepSetup(cfg, config.seed, device, distributed, torch.Generator(device=device),
                      per_update_keys=_per_update_keys(method, state))
    checkpointer = Checkpointer(output_dir, cfg, distributed, tracker, header=lambda: {
        "convention": CONVENTION, "config": resolved.to_dict(),
        "data_spec": {"shape": list(spec.shape), "num_classes": spec.num_classes}, "run_id": tracker.run_id})
    return _Run(resolved, parts, state, setup, checkpointer, batches, device, channels_last)


def _restore(run: _Run, resume: dict[str, Any], rank: int) -> None:
    """Continue exactly where ``resume`` (a checkpoint payload) stopped: weights, optimizers,
    schedules, EMAs, data position and random states."""
    run.checkpointer.remove_leftovers()
    try:
        run.state.load_state_dict(resume)
        run.batches.load_state_dict(resume["data"][rank])
        restore_rng(resume["rng"][rank])
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as exc:  # a foreign or damaged file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(f"the checkpoint resumed does not fit this run ({type(exc).__name__}: {first})") from None


def _train_steps(run: _Run, tracker: Tracker, output_dir: Path, distributed: Distributed, reporting: bool,
                 on_step: Optional[Callable[[int], None]], log: Callable[[str], None]) -> tuple[float, float, Path]:
    """The steps from the state's step to ``train.max_steps``: (final loss, images/s, last checkpoint)."""
    cfg, state, method, device = run.cfg, run.state, run.parts.method, run.device
    start_step = state.step
    for network in state.networks.values():
        network.model.train()
    bar = Progress(cfg.max_steps, start_step, reporting, cfg.log_every)
    eta = _run_eta(run.resolved, method, start_step, reporting, log)
    window = MetricWindow(cfg.batch_size)
    grid_inputs = _FixedGridInputs(run.resolved, run.parts.spec, device)
    final_loss = float("nan")
    checkpoint = run.checkpointer.latest
    prefetched: Optional[Batch] = None
    clock = CheckpointClock(cfg.checkpoint_minutes)
    agreement = StepAgreement(distributed, device, 2)
    with StopRequests() as stops:
        for step in range(start_step, cfg.max_steps):
            batch = _on_device(prefetched if prefetched is not None else next(run.batches), device, run.channels_last)
            prefetched = None
            done = step + 1
            # Every rank must checkpoint (and stop) at the same step: the decisions are agreed on
            # (one step late under torchrun). Rank 0's clock decides: another rank's, due a step
            # later, would ask for a second checkpoint right after the one just written.
            by_time, stop = agreement.exchange([distributed.is_main and clock.due(), stops.requested])
            checkpoint_due = _checkpoint_due(cfg, done, by_time or stop)

            def prefetch() -> None:
                nonlocal prefetched
                # The next batch is collated while the device still works on this step. Never before a
                # checkpoint: the data position saved there must be the one after this step.
                if not checkpoint_due and not method.data_changes_after_step:
                    prefetched = next(run.batches)

            for result in run_step(run.setup, state, batch, step, before_wait=prefetch,
                                   checkpoint=run.checkpointer.last_good,
                                   settle=checkpoint_due or _reads_now(cfg, done)):  # the device check: see step.py
                final_loss = result.sampling_loss if result.sampling_loss is not None else final_loss
                window.add(result.metrics)
            if _logged(cfg, done):
                tracker.log_metrics(_window_metrics(window, state, distributed, device, done, cfg.batch_size), step=done)
            bar.update(done, final_loss, window.images_per_second)
            eta.update(done)
            if _grid_due(cfg, done) and distributed.is_main:
                _sample_grid(run.resolved, method, state.sampling_weights(), run.parts.spec, grid_inputs.noise,
                             grid_inputs.labels, output_dir, tracker, done)
            if checkpoint_due:
                check_weights(state, run.checkpointer.last_good)  # a checkpoint never holds non-finite weights
                checkpoint = run.checkpointer.save(state, run.batches)
                clock.reset()
            if on_step is not None:
                on_step(done)
            if stop:
                bar.close()
                raise TrainingInterrupted(stops.signal_name, done, cfg.max_steps, checkpoint, done,
                                          exit_code=128 + stops.received)
    agreement.close()
    check_weights(state, run.checkpointer.last_good)  # the final model (resumed at max_steps: nothing pending)
    bar.close()
    return final_loss, window.images_per_second, checkpoint


def _checkpoint_due(cfg, done: int, requested: bool) -> bool:
    return bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or requested or done == cfg.max_steps


def _logged(cfg, done: int) -> bool:
    """A step whose window of metrics goes to the tracker."""
    return done % cfg.log_every == 0 or done == cfg.max_steps


def _reads_now(cfg, done: int) -> bool:
    """A step whose values are needed at once: logged, or followed by a sample grid of its weights
    (with the device-side check they are otherwise read during the next step)."""
    return _logged(cfg, done) or _grid_due(cfg, done)


def _grid_due(cfg, done: int) -> bool:
    """A step followed by a sample grid of its weights (``train.sample_every``)."""
    return bool(cfg.sample_every and done % cfg.sample_every == 0)


def _on_device(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    batch = batch.to(device, non_blocking=device.type == "cuda")
    if channels_last:
        batch = Batch(batch.x.contiguous(memory_format=torch.channels_last), batch.cond, batch.noise)
    return batch


def _window_metrics(window: MetricWindow, state: TrainingState, distributed: Distributed, device: torch.device,
                    done: int, batch_size: int) -> dict[str, float]:
    metrics = window.flush(distributed, device)
    if len(state.networks) > 1:
        metrics.update({f"train/lr/{n.name}": n.scheduler.get_last_lr()[0] for n in state.networks.values()})
    else:
        metrics["train/lr"] = state.student.scheduler.get_last_lr()[0]
    metrics.update({"train/images_per_second": window.images_per_second, "train/skipped_steps": state.skipped,
                    "train/images_seen": done * batch_size, "system/peak_memory_mb": peak_memory_mb(device)})
    return metrics
