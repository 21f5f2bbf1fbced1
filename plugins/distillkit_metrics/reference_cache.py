"""The ode_error reference solve, cached on disk per velocity field and protocol.

The reference solve is most of an evaluation's network evaluations (64 per sample against the 15
of the default NFE sweep), and ``distillkit eval`` after ``distillkit run``, or with another
sampler, grid or integrator, solves the same field from the same noise again. It is cached under
``$DISTILLKIT_CACHE/ode_error/`` keyed by everything the solve depends on:

- the velocity field, identified by its outputs on a fixed probe (4 fixed noise samples at 4
  times, fixed labels for class-conditional data): the same weights give the same bytes, other
  weights other bytes. Hashing outputs instead of weights covers every kind of reference
  velocity (a network through its method's ``velocity_fn``, a teacher, an analytic field);
- who it is (``own`` or the teacher's identity), the dataset's name, the data shape and classes;
- n, the first seed, the labels, the integrator, the time grid, the batch size (batched kernels
  round differently), the device type and the torch version.

A file that cannot be read, or records another key, is ignored with one log line and solved
again. References over ``LIMIT_BYTES`` are not cached (50,000 CIFAR-10 samples would be 600 MB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from distillkit import MetricContext, read_cached, save_atomic
from distillkit.evaluation.cache import cache_dir
from distillkit.sampling import prior_noise

FORMAT = "distillkit-ode-error-reference"
VERSION = 1
LIMIT_BYTES = 64 * 2**20
_PROBE_SEED = 20261203
_PROBE_TIMES = (0.95, 0.6, 0.3, 0.02)


def _digest(tensor: Optional[torch.Tensor]) -> Optional[str]:
    if tensor is None:
        return None
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def probe(velocity_for: Callable, context: MetricContext) -> str:
    """sha256 of the velocity field's outputs on the fixed probe."""
    spec = context.spec
    count = len(_PROBE_TIMES)
    x = prior_noise(count, spec.shape, _PROBE_SEED, device=context.device)
    t = torch.tensor(_PROBE_TIMES, device=context.device)
    cond = (torch.arange(count) % spec.num_classes).to(context.device) if spec.num_classes else None
    return _digest(velocity_for(cond)(x, t).float())


def key(velocity_for: Callable, context: MetricContext, *, who: str, integrator: str, grid: torch.Tensor) -> str:
    device = torch.device(context.device)
    fields = {
        "format": FORMAT, "version": VERSION, "velocity": probe(velocity_for, context), "who": who,
        "dataset": context.dataset_name, "shape": list(context.spec.shape), "num_classes": context.spec.num_classes,
        "n": context.n, "seed": context.seed, "labels": _digest(context.labels), "integrator": integrator,
        "grid": [float(t) for t in grid], "batch_size": context.batch_size, "device": device.type,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def path_for(context: MetricContext, digest: str) -> Path:
    return cache_dir() / "ode_error" / f"{context.dataset_name or 'data'}-{digest[:20]}.pt"


def load(path: Path, digest: str, context: MetricContext) -> Optional[torch.Tensor]:
    """The cached reference, or None (missing: silently; unreadable or another key: one log line)."""
    if not path.is_file():
        return None
    payload, why = read_cached(path, {"format": FORMAT, "key": digest})
    reference = payload.get("reference") if payload is not None else None
    expected = (context.n, *context.spec.shape)
    if isinstance(reference, torch.Tensor) and tuple(reference.shape) == expected:
        return reference
    why = why or f"holds no [{', '.join(map(str, expected))}] reference"
    context.log(f"distillkit: ignoring the cached ode_error reference {path} ({why}); solving it again")
    return None


def save(path: Path, digest: str, reference: torch.Tensor, context: MetricContext) -> bool:
    """Cache ``reference`` unless it is too large or the cache cannot be written (one log line)."""
    if reference.numel() * reference.element_size() > LIMIT_BYTES:
        return False
    try:
        save_atomic({"format": FORMAT, "key": digest, "reference": reference.detach().cpu()}, path)
    except OSError as exc:
        context.log(f"distillkit: could not cache the ode_error reference in {path} ({type(exc).__name__}); "
                    f"it is solved again next time")
        return False
    return True
