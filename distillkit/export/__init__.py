"""Distilled generators out of distillkit: ``distillkit export``, ``distillkit run --export`` and
``distillkit.load_generator``.

- ``generator``: ``Generator``, a trained network with its sampler, time grid and NFE fixed, and
  its TorchScript trace;
- ``formats``: the three formats (torchscript, safetensors, mlflow), ``load_generator``;
- ``pyfunc``: the MLflow pyfunc model (imported only for ``--format mlflow``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import attrs

from .formats import FILE_NAMES, FORMATS, check_out, load_generator, parse_formats, read_record
from .generator import Generator


def generator_of(trained, nfe: int, *, weights: str = "ema", run_id: Optional[str] = None) -> Generator:
    """The generator of a ``TrainedModel`` at ``nfe`` with the run's own sampler and grid (the
    method's default sampler or the config's ``sample.sampler``): one-line ConfigError when the
    sampler cannot spend ``nfe``."""
    from ..evaluation.choice import choose_sampling
    from ..plugin_manager import get_registries
    from ..trained import CONVENTION

    resolved = trained.resolved
    choice = choose_sampling(resolved, get_registries(), nfes=(nfe,))
    grid = choice.time_grid(nfe)
    info = {"convention": CONVENTION, "config": resolved.to_dict(),
            "data_spec": {"shape": list(trained.spec.shape), "num_classes": trained.spec.num_classes},
            "sampler": choice.record(), "nfe": nfe, "time_grid": grid.tolist(), "weights": weights,
            "run_id": run_id, "checkpoint_sha256": trained.sha256, "step": trained.step}
    return Generator(trained.method, trained.model, choice.sampler, grid, trained.spec, nfe, info=info)


def run_in_store(run_id: Optional[str], tracking_uri: str) -> bool:
    """Whether ``run_id`` can be read from the store at ``tracking_uri`` (a model can be logged to it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..evaluation.runs import store_exists

    if not run_id or not store_exists(tracking_uri):
        return False
    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException:
        return False
    return True


@attrs.frozen
class Exported:
    format: str
    path: Path
    logged_to: Optional[str] = None  # the MLflow run the model was logged to (mlflow format)


def write(generator: Generator, fmt: str, out: Path, *, run_id: Optional[str] = None,
          tracking_uri: str = "") -> Exported:
    """Write ``generator`` as ``fmt`` to ``out`` (checked with ``check_out`` first); the mlflow
    format is logged to ``run_id`` too when one is given."""
    from .formats import write_mlflow, write_safetensors, write_torchscript

    if fmt == "torchscript":
        return Exported(fmt, write_torchscript(generator, out))
    if fmt == "safetensors":
        return Exported(fmt, write_safetensors(generator, out))
    return Exported(fmt, write_mlflow(generator, out, run_id=run_id, tracking_uri=tracking_uri), run_id)


def export_after_run(checkpoint: Path, formats: tuple[str, ...], nfe: int, out_dir: Path, *,
                     run_id: Optional[str], tracking_uri: str) -> list[Exported]:
    """What ``distillkit run --export`` does once the run finished: each format of the final
    checkpoint's EMA weights at ``nfe`` into ``out_dir`` (``FILE_NAMES``), the MLflow model
    logged to the run when it is tracked."""
    from ..trained import load_trained_model

    trained = load_trained_model(checkpoint)
    generator = generator_of(trained, nfe, run_id=run_id)
    done = []
    for fmt in formats:
        target = out_dir / FILE_NAMES[fmt].format(nfe=nfe)
        if fmt == "mlflow" and target.is_dir():
            shutil.rmtree(target)  # this run's own earlier export (a resumed run finishing again)
        out = check_out(target, fmt)
        done.append(write(generator, fmt, out, run_id=run_id if tracking_uri else None, tracking_uri=tracking_uri))
    return done


__all__ = ["FILE_NAMES", "FORMATS", "Exported", "Generator", "check_out", "export_after_run", "generator_of",
           "load_generator", "parse_formats", "read_record", "run_in_store", "write"]
