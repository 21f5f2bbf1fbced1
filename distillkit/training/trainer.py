"""The single-process trainer. It calls only the Method contract: no method is known by name."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import attrs
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm import tqdm

# torchdata 0.11 calls a deprecated torch API on every loader; the warning means nothing to users.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

from ..config import flatten
from ..contracts import Batch, Dataset, PrepareContext, Teacher
from ..evaluation import Evaluation, evaluate, save_sample_figure
from ..plugin_manager import get_registries
from ..resolve import Resolved
from ..tracking import Tracker
from .build import Components, build_dataset, build_model, count_parameters, describe, pick_device
from ..trained import CONVENTION
from .checkpoint import FORMAT, VERSION, save_atomic
from .ema import make_ema


@attrs.frozen
class RunResult:
    run_id: Optional[str]
    output_dir: Path
    checkpoint: Path
    sample_figure: Path
    evaluation: Evaluation
    final_loss: float
    images_per_second: float


def _batches(loader: StatefulDataLoader) -> Iterator[Batch]:
    """Endless batches, epoch after epoch (the loader reshuffles every epoch)."""
    while True:
        for item in loader:
            yield Batch.from_item(item)


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    if warmup_steps == 0:
        return lambda step: 1.0
    return lambda step: min(1.0, (step + 1) / warmup_steps)


def train(
    resolved: Resolved,
    tracker: Tracker,
    output_dir: Path,
    *,
    dataset: Optional[Dataset] = None,
    teacher: Optional[Teacher] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> RunResult:
    config = resolved.config
    train_cfg = config.train
    device = pick_device(config.device)
    dataset = dataset if dataset is not None else build_dataset(resolved)
    method, student = build_model(resolved, dataset.spec, device, seed=config.seed, teacher=teacher)
    parts = Components(dataset=dataset, spec=dataset.spec, method=method, student=student)
    method.prepare(
        student,
        PrepareContext(device=device, dataset=dataset, output_dir=output_dir, log_artifact=tracker.log_artifact,
                       seed=config.seed, progress=progress),
    )
    data = method.train_set(dataset)
    loader = StatefulDataLoader(
        data,
        batch_size=train_cfg.batch_size,
        shuffle=True,
        drop_last=len(data) >= train_cfg.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    ema = make_ema(student, train_cfg.ema_decay)
    optimizer = torch.optim.Adam(student.parameters(), lr=train_cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(train_cfg.warmup_steps))
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)

    evals = method.network_evals_per_step()
    tracker.log_params(flatten(resolved.to_dict()))
    tags = describe(resolved, parts)
    if teacher is not None:
        tags["distillkit.teacher"] = teacher.identity
    tracker.set_tags(tags)
    tracker.log_metrics(
        {
            "cost/network_evals_with_grad": evals["with_grad"],
            "cost/network_evals_no_grad": evals["no_grad"],
            "model/parameters": count_parameters(student),
        },
        step=0,
    )
    log(
        f"distillkit: {config.method} on {config.dataset} with {resolved.backbone_name} "
        f"({count_parameters(student):,} parameters), {train_cfg.max_steps} steps of {train_cfg.batch_size}, "
        f"{evals['with_grad']} forward+backward and {evals['no_grad']} no-grad network evaluations per step"
    )

    student.train()
    batches = _batches(loader)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    images_per_second, final_loss = 0.0, float("nan")
    bar = tqdm(total=train_cfg.max_steps, disable=not progress, desc="train", unit="step", file=sys.stderr)
    for step in range(train_cfg.max_steps):
        batch = next(batches).to(device)
        output = method.loss(student, batch, generator, step)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update_parameters(student)
        method.after_step(student, step)

        final_loss = float(output.loss.detach())
        window_loss += final_loss
        window_steps += 1
        if (step + 1) % train_cfg.log_every == 0 or step + 1 == train_cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            images_per_second = window_steps * train_cfg.batch_size / max(elapsed, 1e-9)
            metrics = {
                "train/loss": window_loss / window_steps,
                "train/lr": scheduler.get_last_lr()[0],
                "train/images_per_second": images_per_second,
                "train/images_seen": (step + 1) * train_cfg.batch_size,
            }
            metrics.update({f"train/{k}": float(v) for k, v in output.metrics.items()})
            tracker.log_metrics(metrics, step=step + 1)
            bar.set_postfix(loss=f"{window_loss / window_steps:.4f}", img_s=f"{images_per_second:.0f}")
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        bar.update(1)
    bar.close()

    checkpoint = save_atomic(
        {
            "format": FORMAT,
            "version": VERSION,
            "config": resolved.to_dict(),
            "convention": CONVENTION,
            "data_spec": {"shape": list(parts.spec.shape), "num_classes": parts.spec.num_classes},
            "step": train_cfg.max_steps,
            "images_seen": train_cfg.max_steps * train_cfg.batch_size,
            "student": student.state_dict(),
            "ema": ema.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "method": method.state_dict(),
        },
        output_dir / "checkpoint.pt",
    )
    tracker.log_artifact(checkpoint, "checkpoints")

    ema.module.eval()
    registries = get_registries()
    evaluation = evaluate(
        method.velocity_fn(ema.module),
        parts.dataset,
        parts.spec,
        config.sample,
        resolved.sample_integrator,
        registries.integrators.get(config.sample.reference_integrator),
        device,
    )
    tracker.log_metrics(evaluation.metrics(), step=train_cfg.max_steps)
    figure = save_sample_figure(evaluation.samples, parts.spec, output_dir / "samples.png")
    tracker.log_artifact(figure, "samples")
    return RunResult(
        run_id=tracker.run_id,
        output_dir=output_dir,
        checkpoint=checkpoint,
        sample_figure=figure,
        evaluation=evaluation,
        final_loss=final_loss,
        images_per_second=images_per_second,
    )
