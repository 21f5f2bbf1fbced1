"""Checkpoints: plain ``torch.save`` dicts, written atomically, read with ``weights_only=True``;
or the same payload as a safetensors file (``train.checkpoint_format = "safetensors"``, below)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingFailed, UsageError
from ..files import save_atomic  # noqa: F401 - the one atomic save; the trainer imports it from here
from ..files import write_atomic

FORMAT = "distillkit-checkpoint"
#: 2: several networks (``networks``, ``optimizers``, ``schedulers``, ...); version 1 is read too.
VERSION = 2


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a distillkit checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        payload = _load_safetensors(path, map_location) if is_safetensors(path) else \
            torch.load(path, map_location=map_location, weights_only=True)
    except UsageError:
        raise
    except Exception as exc:  # truncated, corrupted, or not a torch file
        raise UsageError(f"checkpoint {path} cannot be read ({type(exc).__name__}): is it truncated or corrupted?") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not a distillkit checkpoint")
    return payload


# ------------------------------------------------------------------------------------------------
# safetensors checkpoints (``train.checkpoint_format = "safetensors"``)
#
# The file keeps its name (``checkpoint.pt``, ``checkpoints/step-N.pt``) so that every tool finds
# it; ``load_checkpoint`` tells the formats apart by their first bytes (a torch file is a zip
# archive, "PK"; a safetensors file is an 8-byte header length, then "{"). Every tensor of the
# payload is a safetensors tensor; everything else (config, step counters, Python's and numpy's RNG
# states, optimizer hyperparameters) is JSON in the metadata under ``distillkit_checkpoint``,
# with tuples, non-string dict keys and tensors tagged so that the payload comes back as it was
# saved (resume stays bitwise: tensor bytes are stored raw, floats as their exact repr).

CHECKPOINT_FORMATS = ("torch", "safetensors")
_SAFETENSORS_KEY = "distillkit_checkpoint"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        # Cloned and contiguous: safetensors refuses views and tensors that share storage.
        tensors[name] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, OrderedDict):
        # a module's state_dict: an OrderedDict whose ``_metadata`` holds the modules' versions
        return {"__ordered__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()],
                "__metadata__": _encode(getattr(value, "_metadata", None), tensors)}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    # A run-time failure (exit 1, one line), not a traceback: a method's state held something the
    # safetensors layout has no place for; the torch format holds any picklable-by-torch value.
    raise TrainingFailed(f"a safetensors checkpoint cannot hold a {type(value).__name__} (from the method's state); "
                         "use train.checkpoint_format=torch for this method")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__ordered__" in value:
            ordered = OrderedDict((_decode(k, tensors), _decode(v, tensors)) for k, v in value["__ordered__"])
            metadata = _decode(value["__metadata__"], tensors)
            if metadata is not None:
                ordered._metadata = metadata  # type: ignore[attr-defined]
            return ordered
        if "__items__" in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def save_checkpoint(payload: dict[str, Any], path: str | Path, checkpoint_format: str = "torch") -> Path:
    """Write ``payload`` atomically as ``checkpoint_format`` (``CHECKPOINT_FORMATS``)."""
    if checkpoint_format == "torch":
        return save_atomic(payload, path)
    if checkpoint_format != "safetensors":
        raise ValueError(f"checkpoint format {checkpoint_format!r}: one of {', '.join(CHECKPOINT_FORMATS)}")
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(payload, tensors))
    metadata = {"format": FORMAT, _SAFETENSORS_KEY: structure}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), temporary_suffix=".tmp")


def is_safetensors(path: str | Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as stream:
        head = stream.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 31)


def _load_safetensors(path: Path, map_location: str | torch.device) -> Any:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(torch.device(map_location))) as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # truncated or corrupted
        raise UsageError(f"checkpoint {path} cannot be read ({type(exc).__name__}): is it truncated or corrupted?") from None
    if _SAFETENSORS_KEY not in metadata:
        raise UsageError(f"{path} is not a distillkit checkpoint")
    return _decode(json.loads(metadata[_SAFETENSORS_KEY]), tensors)


#: what resuming a run reads from its checkpoint (``TrainingState.load_state_dict``, the RNG
#: states, the data positions); a version-1 checkpoint has ``optimizer``/``scheduler`` only.
RESUME_KEYS = ("config", "data_spec", "student", "ema_state", "scaler", "method", "step", "rng", "data")
#: what sampling, evaluating or distilling a trained model reads.
MODEL_KEYS = ("config", "data_spec", "step")


def require_keys(payload: dict[str, Any], path: str | Path, keys: tuple[str, ...], purpose: str) -> None:
    """A one-line ``UsageError`` when ``payload`` lacks one of ``keys`` (a truncated or foreign file
    that still says it is a distillkit checkpoint); ``RESUME_KEYS`` also need an optimizer and a
    schedule (under the name of either version)."""
    missing = [key for key in keys if key not in payload]
    if keys == RESUME_KEYS:
        missing += [old for old, new in (("optimizer", "optimizers"), ("scheduler", "schedulers"))
                    if old not in payload and new not in payload]
    if missing:
        raise UsageError(f"checkpoint {path} is incomplete: it has no {', '.join(repr(k) for k in missing)}, "
                         f"which {purpose} needs (is it a checkpoint distillkit wrote?)")
    if not isinstance(payload.get("config"), dict):
        raise UsageError(f"checkpoint {path} is incomplete: its 'config' is not a run configuration")
