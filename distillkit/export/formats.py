"""Writing a ``Generator`` out, and reading one back.

- ``torchscript``: one ``.pt`` file (``torch.jit.save``) with the traced sampling loop; the export
  record is stored beside it in the archive as ``extra/distillkit.json``.
- ``safetensors``: one ``.safetensors`` file: the network's weights as tensors, and the export
  record (resolved run config, data spec, sampler, grid, NFE, time grid, provenance) as JSON in
  the file's metadata under ``distillkit``; ``load_generator`` rebuilds the generator from it
  with the installed plugins.
- ``mlflow``: an MLflow pyfunc model folder (``distillkit.export.pyfunc``) holding the
  safetensors file as its artifact.

Every file is written to a temporary name in the target folder and renamed into place, so a
failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DistillkitError, UsageError
from ..files import write_atomic
from .generator import Generator

FORMATS = ("torchscript", "safetensors", "mlflow")
#: What ``--format`` writes when ``--out`` is a folder (``distillkit run --export``).
FILE_NAMES = {"torchscript": "generator-nfe{nfe}.pt", "safetensors": "generator-nfe{nfe}.safetensors",
              "mlflow": "mlflow-model-nfe{nfe}"}
GENERATOR_FORMAT = "distillkit-generator"
GENERATOR_VERSION = 1
METADATA_KEY = "distillkit"
TORCHSCRIPT_RECORD = "distillkit.json"


def parse_formats(text: str, option: str = "--format") -> tuple[str, ...]:
    """``torchscript``, ``safetensors``, ``mlflow`` or a comma-separated list of them."""
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    unknown = [name for name in names if name not in FORMATS]
    if not names or unknown:
        raise ConfigError(option, unknown[0] if unknown else text, "one or more of " + ", ".join(FORMATS))
    return names


def check_out(out: str | Path, fmt: str) -> Path:
    """``--out`` checked before any work: a file path (torchscript, safetensors) or a folder that
    does not exist yet or is empty (mlflow), in a writable folder."""
    path = Path(out).expanduser()
    if fmt == "mlflow":
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UsageError(f"--out={out}: an MLflow model is a new folder; {path} already exists and is not empty")
    elif path.is_dir():
        raise UsageError(f"--out={out}: {fmt} writes one file; {path} is a folder")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not _writable(ancestor):
        raise UsageError(f"--out={out}: {ancestor} is not a writable folder")
    return path


def _writable(folder: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            return True
    except OSError:
        return False


def record_of(generator: Generator) -> dict[str, Any]:
    return {"format": GENERATOR_FORMAT, "version": GENERATOR_VERSION, **generator.info}


def write_torchscript(generator: Generator, out: Path) -> Path:
    module = generator.to_torchscript()
    extra = {TORCHSCRIPT_RECORD: json.dumps(record_of(generator), default=str)}

    def save(temporary: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            torch.jit.save(module, str(temporary), _extra_files=extra)

    return write_atomic(out, save)


def write_safetensors(generator: Generator, out: Path) -> Path:
    from safetensors.torch import save_file

    # Cloned and contiguous: safetensors refuses tensors that share storage (tied weights).
    tensors = {name: value.detach().to("cpu").contiguous().clone() for name, value in generator.network.state_dict().items()}
    metadata = {"format": GENERATOR_FORMAT, METADATA_KEY: json.dumps(record_of(generator), default=str)}
    return write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_record(path: Path) -> dict[str, Any]:
    """The export record of a generator ``.safetensors`` file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # not a safetensors file, truncated
        raise UsageError(f"{path} cannot be read as a safetensors file ({type(exc).__name__})") from None
    if metadata.get("format") != GENERATOR_FORMAT or METADATA_KEY not in metadata:
        raise UsageError(f"{path} is not a distillkit generator (written by distillkit export --format safetensors)")
    record = json.loads(metadata[METADATA_KEY])
    if record.get("version", 0) > GENERATOR_VERSION:
        raise UsageError(f"{path} is a version {record['version']} generator; this distillkit reads up to "
                         f"{GENERATOR_VERSION}")
    return record


def load_generator(path: str | Path, *, device: str | torch.device = "cpu") -> Generator:
    """The generator a ``distillkit export --format safetensors`` file (or an MLflow model folder
    of ``--format mlflow``) holds, rebuilt with the installed plugins: the same function, the
    same sampler, grid and NFE."""
    from safetensors.torch import load_file

    from ..config import run_config_from_dict
    from ..contracts import DataSpec
    from ..evaluation.choice import choose_sampling
    from ..plugin_manager import get_registries
    from ..resolve import resolve
    from ..training.build import build_model

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "artifacts" / "generator.safetensors"
    if not path.is_file():
        raise UsageError(f"generator {path} does not exist")
    record = read_record(path)
    registries = get_registries()
    resolved = resolve(run_config_from_dict(record["config"]), registries)
    spec = DataSpec(tuple(record["data_spec"]["shape"]), record["data_spec"].get("num_classes"))
    device = torch.device(device)
    method, network = build_model(resolved, spec, device, seed=0)
    try:
        network.load_state_dict(load_file(str(path), device=str(device)))
    except RuntimeError as exc:
        raise UsageError(f"{path}: weights do not fit the network its config describes "
                         f"({str(exc).splitlines()[0]})") from None
    network.eval().requires_grad_(False)
    sampler = record["sampler"]
    nfe = int(record["nfe"])
    choice = choose_sampling(resolved, registries, sampler=sampler["name"], sampler_options=sampler["options"],
                             integrator=sampler["integrator"], grid=sampler["grid"],
                             grid_options=sampler["grid_options"], nfes=(nfe,))
    grid = choice.time_grid(nfe)
    stored = torch.tensor(record["time_grid"], dtype=grid.dtype)
    if grid.shape != stored.shape or not torch.equal(grid, stored):
        raise DistillkitError(f"{path}: the installed {sampler['grid']} grid plugin makes another time grid than the "
                              f"exported one ({grid.tolist()} vs {stored.tolist()})")
    return Generator(method, network, choice.sampler, grid, spec, nfe, info=record)


def write_mlflow(generator: Generator, out: Path, *, run_id: str | None = None, tracking_uri: str = "") -> Path:
    """An MLflow pyfunc model folder at ``out``; logged to ``run_id`` too when one is given."""
    with warnings.catch_warnings():
        # MLflow's advice on predict's type hints (requests are {seed, n, labels}, see pyfunc.py),
        # given when the model class is defined under a filter MLflow sets itself: not shown.
        warnings.showwarning = lambda *args, **kwargs: None
        from .pyfunc import save_pyfunc

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        weights = write_safetensors(generator, staging / "generator.safetensors")
        model_dir = staging / "model"
        save_pyfunc(model_dir, weights, generator)
        if run_id:
            from .pyfunc import log_pyfunc

            log_pyfunc(weights, generator, run_id=run_id, tracking_uri=tracking_uri)
        if out.exists():
            out.rmdir()  # checked empty by check_out
        model_dir.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
