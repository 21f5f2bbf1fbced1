"""Timing distillkit's own training loop, as a user runs it, on synthetic data of any shape.

The trainer is run exactly as ``distillkit run`` runs it (``distillkit.training.trainer.train``:
the StatefulDataLoader, the method's loss, gradient-norm check, Adam, EMA, logging), with the
in-memory tracker. Steps are timed from the trainer's own ``on_step`` callback, so start-up (model
build, a method's ``prepare``) is excluded and timed separately; the callback stops the run after
the timed steps, before any final checkpoint or evaluation.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from distillkit import Dataset, DataSpec, get_registries
from distillkit.config import run_config_from_dict
from distillkit.contracts import TeacherContext
from distillkit.resolve import resolve
from distillkit.teachers import load_teacher
from distillkit.tracking import NullTracker
from distillkit.training.trainer import train

from _common import fail, split_variant, synchronize, variants_allowed

#: Data shapes and networks of the benchmark presets: the CPU default (the digits U-Net users
#: train first) and the CIFAR-10 scale the papers use (EDM's DDPM++ network, batch 128).
PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"shape": (1, 8, 8), "backbone": "unet", "backbone_options": {}, "batch": 128},
    "mnist": {"shape": (1, 28, 28), "backbone": "songunet", "backbone_options": {"preset": "mnist"}, "batch": 256},
    "cifar10": {"shape": (3, 32, 32), "backbone": "songunet", "backbone_options": {"preset": "cifar10"}, "batch": 128},
    # CIFAR-shaped data through the small default U-Net: sampling at CIFAR size on a CPU.
    "cifar10-small": {"shape": (3, 32, 32), "backbone": "unet", "backbone_options": {}, "batch": 128},
    # A few-second stand-in for tests of the benchmark scripts themselves.
    "tiny": {"shape": (1, 8, 8), "backbone": "unet", "backbone_options": {"channels": 8, "num_groups": 4}, "batch": 16},
}


def describe_preset(name: str) -> str:
    """The markdown phrase every benchmark uses for a preset's network and data."""
    p = PRESETS[name]
    return (f"Network: `{p['backbone']}` {p['backbone_options'] or ''} on synthetic {p['shape']} data, "
            f"batch {p['batch']}")


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


class SyntheticImages(Dataset):
    """Uniform noise in [-1, 1] of the preset's shape: speed does not depend on what the pixels are."""

    name = "synthetic"
    default_backbone = "unet"

    def __init__(self, shape: tuple[int, ...], count: int, seed: int = 0):
        super().__init__(None, None)
        self._spec = DataSpec(tuple(shape))
        self.data = torch.rand((count, *shape), generator=torch.Generator().manual_seed(seed)) * 2 - 1

    @property
    def spec(self) -> DataSpec:
        return self._spec

    def train_set(self):
        return _Tensors(self.data)

    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.data[:n]


def variant_parts(label: str) -> tuple[str, Optional[str]]:
    """``cud-rk3`` -> (cud, rk3); ``rf-distill`` -> (rf-distill, None); else one line, exit 2."""
    parts = split_variant(label, get_registries())
    if parts is None:
        fail(f"variant {label!r}: not one of {variants_allowed(get_registries())}")
    return parts


def config_tree(label: str, preset: str, *, device: torch.device, steps: int, batch: Optional[int] = None,
                precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                compile_mode: str = "default", method_options: Optional[dict] = None, teacher: str = "") -> dict:
    method, integrator = variant_parts(label)
    p = PRESETS[preset]
    return {
        "method": method, "integrator": integrator or "euler", "dataset": "digits",
        "backbone": p["backbone"], "backbone_options": dict(p["backbone_options"]),
        "method_options": dict(method_options or {}), "device": str(device), "seed": 0, "teacher": teacher,
        "train": {"batch_size": batch or p["batch"], "max_steps": steps, "precision": precision,
                  "channels_last": channels_last, "compile": compile, "compile_mode": compile_mode,
                  "checkpoint_every": 0, "sample_every": 0},
        # Only used if a run reaches its end (teacher checkpoints): keep that evaluation trivial.
        "sample": {"num_samples": 8, "nfe": [1], "reference_integrator": "euler", "reference_steps": 1},
    }


class _Stop(Exception):
    """Raised from ``on_step`` to end a timed run without its final checkpoint and evaluation."""


def time_training(tree: dict, dataset: SyntheticImages, device: torch.device, *, warmup: int, timed: int,
                  teacher=None, work: Optional[Path] = None) -> dict[str, float]:
    """images/s and seconds per step of ``timed`` optimizer steps after ``warmup`` steps, the
    seconds from the call to the first step's end (build + prepare + one step), peak memory."""
    tree = {**tree, "train": {**tree["train"], "max_steps": warmup + timed + 1}}
    resolved = resolve(run_config_from_dict(tree), get_registries())
    marks: dict[int, float] = {}

    def on_step(step: int) -> None:
        if step in (1, warmup, warmup + timed):
            synchronize(device)
            marks[step] = time.perf_counter()
        if step == warmup + timed:
            raise _Stop

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work) as out:
        try:
            train(resolved, NullTracker(), Path(out), dataset=dataset, teacher=teacher, device=device,
                  progress=False, on_step=on_step, log=lambda line: None)
        except _Stop:
            pass
    elapsed = marks[warmup + timed] - marks[warmup]
    batch = tree["train"]["batch_size"]
    return {
        "images_per_second": timed * batch / elapsed,
        "seconds_per_step": elapsed / timed,
        "startup_seconds": marks[1] - started,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan"),
    }


def make_teacher(label: str, preset: str, dataset: SyntheticImages, device: torch.device, work: Path):
    """A one-step ``label`` run's checkpoint, loaded as a teacher: its weights are untrained, which
    costs exactly what a trained teacher costs per evaluation."""
    tree = config_tree(label, preset, device=device, steps=1)
    resolved = resolve(run_config_from_dict(tree), get_registries())
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"teacher-{label}-"))
    train(resolved, NullTracker(), out, dataset=dataset, device=device, progress=False, log=lambda line: None)
    context = TeacherContext(data=dataset.spec, dataset_name="digits", dataset_config=resolved.dataset_config,
                             device=device, runs_dir=str(work))
    return load_teacher(str(out / "checkpoint.pt"), get_registries(), context)
