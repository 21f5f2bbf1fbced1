"""Trained models as objects: find a run's checkpoint, rebuild its network, get its velocity.

Used by teachers (a run or checkpoint file distilled by another method) and by sampling and
evaluation. The checkpoint carries the resolved config and the data shape, so nothing but the
installed plugins is needed to rebuild the model (not the dataset files).
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path
from typing import Optional

import attrs
import torch
from torch import nn

from .config import run_config_from_dict
from .contracts import DataSpec, Method, SamplingModel, VelocityFn
from .errors import UsageError
from .plugin_manager import get_registries
from .resolve import Resolved, resolve
from .training.build import build_model
from .training.checkpoint import MODEL_KEYS, load_checkpoint, require_keys

CONVENTION = "t0=data,t1=noise,x_t=(1-t)x+t*eps,v=eps-x"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@attrs.frozen
class TrainedModel:
    resolved: Resolved
    method: Method
    model: nn.Module  # in eval mode, the weights asked for (EMA or online)
    spec: DataSpec
    checkpoint: Path
    sha256: str
    step: int

    def velocity_fn(self, cond: Optional[torch.Tensor] = None) -> VelocityFn:
        return self.method.velocity_fn(self.model, cond)

    def sampling_model(self, cond: Optional[torch.Tensor] = None) -> SamplingModel:
        """What samplers use for a batch with labels ``cond`` (``Method.sampling_model``)."""
        return self.method.sampling_model(self.model, cond)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_trained_model(path: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the network of a distillkit checkpoint.

    ``weights``: ``ema`` (the run's default EMA), ``online`` (the raw student), or the name of one
    of the run's EMAs (``ema_0.9999``, ``ema_hl500000``).
    """
    path = Path(path)
    payload = load_checkpoint(path, map_location=device)
    require_keys(payload, path, MODEL_KEYS + (("ema",) if weights == "ema" else ("student",) if weights == "online" else ()),
                 "a trained model")
    named = payload.get("emas", {})
    if weights == "ema":
        state = payload["ema"]
    elif weights == "online":
        state = payload["student"]
    elif weights in named:
        state = named[weights]
    else:
        allowed = ", ".join(["ema", "online", *named])
        raise UsageError(f"weights={weights!r} is not allowed: {allowed}")
    if payload.get("convention", CONVENTION) != CONVENTION:
        raise UsageError(f"{path} uses the time convention {payload['convention']!r}, not {CONVENTION!r}")
    resolved = resolve(run_config_from_dict(payload["config"]), get_registries())
    data = payload["data_spec"]
    spec = DataSpec(tuple(data["shape"]), data.get("num_classes"))
    method, model = build_model(resolved, spec, torch.device(device), seed=0)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"{path}: weights do not fit the network its config describes ({str(exc).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return TrainedModel(resolved, method, model, spec, path, file_sha256(path), int(payload["step"]))


def find_checkpoint(reference: str, *, runs_dir: str | Path, tracking_uri: str = "") -> Optional[tuple[Path, str]]:
    """(checkpoint path, identity) for a checkpoint file or an MLflow run id (or an unambiguous
    prefix of one); None when ``reference`` is neither an existing file nor shaped like a run id.

    A run's checkpoint is read from ``<runs_dir>/runs/<run_id>/checkpoint.pt`` when it is there,
    else downloaded from the run's artifacts.
    """
    candidate = Path(reference).expanduser()
    if candidate.is_file():
        return candidate.resolve(), f"file:{candidate.resolve()}"
    from .run_ids import expand_run_id

    reference = expand_run_id(reference, runs_dir=runs_dir, tracking_uri=tracking_uri, option="--teacher")
    if not _RUN_ID.match(reference):
        return None
    local = Path(runs_dir).expanduser().resolve() / "runs" / reference / "checkpoint.pt"
    if local.is_file():
        return local, f"run:{reference}"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, Path(runs_dir).expanduser().resolve())
    try:
        client = MlflowClient(tracking_uri=uri)
        client.get_run(reference)
        target = Path(tempfile.mkdtemp(prefix="distillkit-teacher-"))
        downloaded = client.download_artifacts(reference, "checkpoints/checkpoint.pt", str(target))
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"run {reference} cannot be read from {uri}: {first}") from None
    return Path(downloaded), f"run:{reference}"


# Starting a student from its teacher's weights (checkpoint / run teachers have a network of the
# same shapes; a foreign teacher (EDM, diffusers) exposes its network as ``teacher.network``, and
# a student fits it when built with ``teacher.student_backbone``; analytic teachers have none).
# Shared by every distillation method plugin.

_log = logging.getLogger("distillkit.init")


def teacher_network(teacher: object) -> Optional[nn.Module]:
    """The network behind a teacher: ``teacher.network`` (foreign teachers), else a checkpoint /
    run teacher's ``teacher.trained.model``, else None."""
    network = getattr(teacher, "network", None)
    if isinstance(network, nn.Module):
        return network
    return getattr(getattr(teacher, "trained", None), "model", None)


def _same_shapes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def _option_text(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_option_text(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def student_backbone_advice(teacher: object) -> str:
    """One line: why the student cannot start from the teacher's weights and what would let it."""
    suggested = getattr(teacher, "student_backbone", None)
    if suggested is None:
        kind = type(teacher_network(teacher)).__name__
        return (f"the student starts from random weights: the teacher's network ({kind}) has no distillkit "
                f"backbone of the same architecture (method_options.init_from_teacher=false silences this)")
    name, options = suggested
    flags = " ".join(f"--set backbone_options.{k}={_option_text(v)}" for k, v in options.items())
    return (f"the student starts from random weights: its network differs from the teacher's; to start from the "
            f"teacher's weights pass --backbone {name} {flags}")


def copy_teacher_weights(target: nn.Module, teacher: object) -> str:
    """Load the teacher network's weights into ``target`` when their state dicts have the same
    keys and shapes, else its ``backbone``'s (the trunk and main head of a multi-head student,
    e.g. CUD's). Returns what was copied: ``teacher``, ``teacher-backbone`` or ``random``; a
    teacher network that fits nowhere is reported in one line (``student_backbone_advice``)."""
    source = teacher_network(teacher)
    if source is None:
        return "random"
    wanted = target.state_dict()
    for label, module in (("teacher", source), ("teacher-backbone", getattr(source, "backbone", None))):
        if isinstance(module, nn.Module) and _same_shapes(module.state_dict(), wanted):
            target.load_state_dict(module.state_dict())
            return label
    if getattr(teacher, "network", None) is not None:  # a foreign teacher: say what would fit
        _log.warning(student_backbone_advice(teacher))
    return "random"
