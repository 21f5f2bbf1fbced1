"""The trainer. It calls only the Method contract: no method is known by name.

One loop serves one process and ``torchrun`` with DDP alike. Every random number a step draws is
either reseeded from (seed, step, micro-batch) — the loss generator — or saved in the checkpoint —
the global torch state that dropout uses, the data position — so a resumed run continues exactly
where the interrupted one was.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch
from torch.nn.parallel import DistributedDataParallel
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from ..config import flatten
from ..contracts import Batch, Dataset, PrepareContext, Teacher
from ..errors import ConfigError, TrainingFailed
from ..evaluation import Evaluation, class_labels, evaluate, save_sample_figure
from ..plugin_manager import get_registries
from ..resolve import Resolved
from ..sampling import prior_noise, sample_ode, sampling_grid, steps_for_nfe
from ..trained import CONVENTION
from ..tracking import Tracker
from .build import Components, build_dataset, build_model, count_parameters, describe
from .checkpoint import FORMAT, VERSION, save_atomic
from .distributed import Distributed
from .ema import make_emas
from .state import EpochBatches, capture_rng, link_latest, prune, restore_rng, step_file

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


def micro_batch_seed(seed: int, step: int, micro: int) -> int:
    """The loss generator's seed for one micro-batch: a pure function of (seed, step, micro), so
    resuming needs no generator state and a DDP rank draws what the same chunk draws in one process."""
    return (seed * 0x9E3779B1 + step * 1_000_003 + micro * 7_919) % (2**63 - 1)


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    if warmup_steps == 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_steps)


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def _set_matmul_precision(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _chunk(batch: Batch, index: int, count: int) -> Batch:
    """Micro-batch ``index`` of ``count``, interleaved (rows index, index + count, ...): the rows a
    DDP rank would get from the distributed sampler, so accumulation in one process and DDP agree."""
    if count == 1:
        return batch

    def take(value):
        return None if value is None else value[index::count]

    return Batch(batch.x[index::count], take(batch.cond), take(batch.noise))


class _Progress:
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
    config = resolved.config
    cfg = config.train
    from .build import pick_device

    device = device or pick_device(config.device)
    world, rank = distributed.world_size, distributed.rank
    if cfg.batch_size % (world * cfg.grad_accumulation):
        raise ConfigError("train.batch_size", cfg.batch_size,
                          f"a multiple of processes x grad_accumulation = {world * cfg.grad_accumulation}")
    local_batch = cfg.batch_size // world
    _set_matmul_precision(cfg.precision)

    dataset = dataset if dataset is not None else build_dataset(resolved)
    method, student = build_model(resolved, dataset.spec, device, seed=config.seed, teacher=teacher)
    parts = Components(dataset=dataset, spec=dataset.spec, method=method, student=student)
    image_model = cfg.channels_last and dataset.spec.is_image
    if image_model:
        student = student.to(memory_format=torch.channels_last)
    method.prepare(
        student,
        PrepareContext(device=device, dataset=dataset, output_dir=output_dir,
                       log_artifact=tracker.log_artifact, seed=config.seed, progress=progress and distributed.is_main),
    )
    data = method.train_set(dataset)
    if len(data) // world < local_batch:
        raise ConfigError("train.batch_size", cfg.batch_size, f"at most {len(data)} for this training set")
    sampler = StatefulDistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=config.seed, drop_last=True)
    # The loader's own generator: a new epoch's iterator draws a worker seed from it, and drawing
    # from the global generator instead would shift dropout's random stream on resume.
    # Pinned batches on CUDA: the copy to the GPU does not wait for the previous step's kernels.
    loader = StatefulDataLoader(data, batch_size=local_batch, sampler=sampler, drop_last=True,
                                generator=torch.Generator().manual_seed(config.seed), pin_memory=device.type == "cuda")
    batches = EpochBatches(loader, sampler)

    emas = make_emas(student, cfg.ema_decay, cfg.ema_halflife_images, cfg.ema_rampup_ratio, cfg.batch_size)
    default_ema = next(iter(emas))
    parameters = list(student.parameters())  # walked once: a large network has thousands of modules
    optimizer = torch.optim.Adam(parameters, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    model: torch.nn.Module = student
    if distributed.enabled:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    generator = torch.Generator(device=device)

    start_step = 0
    if resume is not None:
        # Leftovers of writes a crash interrupted: the files they would have replaced are intact.
        for leftover in [*(output_dir / "checkpoints").glob(".*.tmp"), *output_dir.glob(".checkpoint.pt.*")]:
            leftover.unlink(missing_ok=True)
        student.load_state_dict(resume["student"])
        for name, ema in emas.items():
            ema.load_state_dict(resume["ema_state"][name])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        method.load_state_dict(resume["method"])
        batches.load_state_dict(resume["data"][rank])
        restore_rng(resume["rng"][rank])
        start_step = int(resume["step"])

    evals = method.network_evals_per_step()
    if start_step == 0:
        tracker.log_params(flatten(resolved.to_dict()))
        tags = describe(resolved, parts)
        tags["distillkit.ema"] = ",".join(emas)
        if teacher is not None:
            tags["distillkit.teacher"] = teacher.identity
        tracker.set_tags(tags)
        tracker.log_metrics({"cost/network_evals_with_grad": evals["with_grad"],
                             "cost/network_evals_no_grad": evals["no_grad"],
                             "cost/network_evals_once": method.network_evals_once(),
                             "model/parameters": count_parameters(student)}, step=0)
    if distributed.is_main:
        log(f"distillkit: {config.method} on {config.dataset} with {resolved.backbone_name} "
            f"({count_parameters(student):,} parameters), {cfg.max_steps} steps of {cfg.batch_size}"
            f"{f' on {world} processes' if world > 1 else ''}, {evals['with_grad']} forward+backward and "
            f"{evals['no_grad']} no-grad network evaluations per step"
            + (f" (plus {method.network_evals_once():,} once, for the data it trains on)" if method.network_evals_once() else "")
            + (f"; resuming at step {start_step}" if start_step else ""))

    fixed_noise = prior_noise(_GRID_IMAGES, dataset.spec.shape, config.sample.seed, device=device)
    fixed_labels = (class_labels(_GRID_IMAGES, dataset.spec.num_classes, config.sample.seed).to(device)
                    if dataset.spec.num_classes else None)

    def save_checkpoint(step: int) -> Path:
        """Rank 0 writes; every rank contributes its RNG and data position."""
        rng_states = distributed.gather(capture_rng())
        data_states = distributed.gather(batches.state_dict())
        path = output_dir / "checkpoint.pt"
        if distributed.is_main:
            payload = {
                "format": FORMAT, "version": VERSION, "convention": CONVENTION,
                "config": resolved.to_dict(),
                "data_spec": {"shape": list(dataset.spec.shape), "num_classes": dataset.spec.num_classes},
                "run_id": tracker.run_id, "step": step, "images_seen": step * cfg.batch_size,
                "world_size": world,
                "student": student.state_dict(),
                "ema": emas[default_ema].module.state_dict(),
                "emas": {name: ema.module.state_dict() for name, ema in emas.items()},
                "ema_state": {name: ema.state_dict() for name, ema in emas.items()},
                "default_ema": default_ema,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "method": method.state_dict(),
                "rng": rng_states, "data": data_states, "skipped_steps": skipped,
            }
            history = output_dir / "checkpoints"
            written = save_atomic(payload, step_file(history, step))
            link_latest(written, path)
            prune(history, cfg.keep_last, cfg.keep_every)
            tracker.log_artifact(path, "checkpoints")
            if cfg.keep_every and step % cfg.keep_every == 0:
                tracker.log_artifact(written, "checkpoints/history")
        distributed.barrier()
        return path

    def sample_grid(step: int) -> None:
        ema_model = emas[default_ema].module
        ema_model.eval()
        rows = []
        for nfe in cfg.sample_nfe:
            grid = sampling_grid(config.sample.grid, steps_for_nfe(resolved.sample_integrator, nfe))
            rows.append(sample_ode(method.velocity_fn(ema_model, fixed_labels), fixed_noise, grid,
                                   resolved.sample_integrator).cpu())
        path = save_sample_figure(dict(zip(cfg.sample_nfe, rows)), dataset.spec, output_dir / "grids" / f"step-{step:08d}.png")
        tracker.log_image(path, key="samples/train", step=step)

    model.train()
    bar = _Progress(cfg.max_steps, start_step, progress and distributed.is_main, cfg.log_every)
    window: dict[str, float] = {}
    window_counts: dict[str, int] = {}
    window_steps, window_start = 0, time.perf_counter()
    images_per_second, final_loss = 0.0, float("nan")
    skipped = int(resume.get("skipped_steps", 0)) if resume is not None else 0
    checkpoint = output_dir / "checkpoint.pt"
    prefetched: Optional[Batch] = None
    for step in range(start_step, cfg.max_steps):
        batch = (prefetched if prefetched is not None else next(batches)).to(device, non_blocking=device.type == "cuda")
        prefetched = None
        if image_model:
            batch = Batch(batch.x.contiguous(memory_format=torch.channels_last), batch.cond, batch.noise)
        optimizer.zero_grad(set_to_none=True)
        step_metrics: dict[str, float] = {}
        losses: list[torch.Tensor] = []
        device_metrics: dict[str, list[torch.Tensor]] = {}
        for micro in range(cfg.grad_accumulation):
            generator.manual_seed(micro_batch_seed(config.seed, step, micro * world + rank))
            sync = contextlib.nullcontext()
            if distributed.enabled and micro < cfg.grad_accumulation - 1:
                sync = model.no_sync()  # type: ignore[operator]
            with sync:
                with _autocast(device, cfg.precision):
                    output = method.loss(model, _chunk(batch, micro, cfg.grad_accumulation), generator, step)
                scaler.scale(output.loss / cfg.grad_accumulation).backward()
            losses.append(output.loss.detach().float())
            for key, value in output.metrics.items():
                if isinstance(value, torch.Tensor):  # read back below, with the loss, in one wait
                    device_metrics.setdefault(key, []).append(value.detach().float().reshape(()))
                else:
                    step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / cfg.grad_accumulation
        scaler.unscale_(optimizer)
        # One pass over the gradients gives the norm (logged), the clipping, and the fault check.
        grad_norm_tensor = torch.nn.utils.clip_grad_norm_(
            parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        done = step + 1
        checkpoint_due = bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps
        if not checkpoint_due and not method.data_changes_after_step:
            # The next batch is collated while the device still works on this step. Never before a
            # checkpoint: the data position saved there must be the one after this step.
            prefetched = next(batches)
        # The step's one wait for the device: loss, gradient norm and the method's tensor metrics
        # read back together.
        here = losses[0].device
        loss_value, grad_norm, *values = torch.stack(
            [sum(losses) / cfg.grad_accumulation, grad_norm_tensor.detach().float().to(here),
             *(sum(v).to(here) / cfg.grad_accumulation for v in device_metrics.values())]).tolist()
        step_metrics.update(zip(device_metrics, values))
        step_metrics["loss"] = loss_value
        step_metrics["grad_norm"] = grad_norm
        # Under fp16 an overflowing gradient is the loss scaler's business (it skips the step).
        finite = math.isfinite(step_metrics["loss"]) and (cfg.precision == "fp16" or math.isfinite(grad_norm))
        if not finite and cfg.nonfinite == "stop":
            raise TrainingFailed(
                f"non-finite {'loss' if not math.isfinite(step_metrics['loss']) else 'gradient'} at step {done} "
                f"(loss {step_metrics['loss']}, gradient norm {grad_norm}); the last good checkpoint is "
                + (str(output_dir / "checkpoint.pt") if (output_dir / "checkpoint.pt").exists() else "none (no checkpoint was written yet)")
                + "; set train.nonfinite=skip to skip such steps"
            )
        if finite:
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for ema in emas.values():
                ema.update_parameters(student)
            method.after_step(student, step)
        else:
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            step_metrics = {}  # a skipped step contributes nothing to the logged averages
        final_loss = step_metrics.get("loss", final_loss)
        for key, value in step_metrics.items():
            window[key] = window.get(key, 0.0) + value
            window_counts[key] = window_counts.get(key, 0) + 1
        window_steps += 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            images_per_second = window_steps * cfg.batch_size / max(elapsed, 1e-9)
            averaged = distributed.mean({k: v / window_counts[k] for k, v in window.items()}, device)
            metrics = {f"train/{k}": v for k, v in averaged.items()}
            metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/images_per_second": images_per_second,
                            "train/skipped_steps": skipped,
                            "train/images_seen": done * cfg.batch_size,
                            "system/peak_memory_mb": _peak_memory_mb(device)})
            tracker.log_metrics(metrics, step=done)
            window, window_counts, window_steps, window_start = {}, {}, 0, time.perf_counter()
        bar.update(done, final_loss, images_per_second)
        if cfg.sample_every and done % cfg.sample_every == 0 and distributed.is_main:
            sample_grid(done)
        if checkpoint_due:
            checkpoint = save_checkpoint(done)
        if on_step is not None:
            on_step(done)
    bar.close()

    if not distributed.is_main:
        return RunResult(tracker.run_id, output_dir, checkpoint, None, None, final_loss, images_per_second, start_step)
    ema_model = emas[default_ema].module
    ema_model.eval()
    registries = get_registries()
    evaluation = evaluate(
        method.velocity_fn(ema_model), dataset, dataset.spec, config.sample, resolved.sample_integrator,
        registries.integrators.get(config.sample.reference_integrator), device,
        velocity_for=lambda cond: method.velocity_fn(ema_model, cond),
    )
    tracker.log_metrics(evaluation.metrics(), step=cfg.max_steps)
    figure = save_sample_figure(evaluation.samples, dataset.spec, output_dir / "samples.png")
    tracker.log_artifact(figure, "samples")
    # Written last: a run without it (killed during the evaluation, say) is resumed by --resume auto.
    (output_dir / FINISHED_MARKER).write_text(json.dumps(evaluation.metrics(), indent=2))
    return RunResult(tracker.run_id, output_dir, checkpoint, figure, evaluation, final_loss, images_per_second, start_step)
