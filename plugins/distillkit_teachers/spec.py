"""Reading ``--teacher KIND:PATH[,key=value...]`` and the checks every foreign teacher shares."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

import distillkit


def split_spec(spec: str, kind: str, allowed: dict[str, str]) -> Optional[tuple[Path, dict[str, str]]]:
    """``(path, options)`` of ``kind:PATH[,key=value...]``, or None when ``spec`` is not of this kind.

    ``allowed`` maps each option name to a description of its values (for the error). A path
    that itself contains commas is taken whole when it exists.
    """
    prefix = f"{kind}:"
    if not spec.startswith(prefix):
        return None
    rest = spec[len(prefix):]
    if not rest:
        raise distillkit.ConfigError("teacher", spec, f"{kind}:PATH (the path is missing)")
    if Path(rest).expanduser().exists():
        return Path(rest).expanduser(), {}
    path, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in allowed:
            known = "; ".join(f"{name}={values}" for name, values in allowed.items()) or "none"
            raise distillkit.ConfigError("teacher", spec, f"{kind}:PATH[,key=value...] with options {known}")
        options[key] = value
    return Path(path).expanduser(), options


def require_existing(spec: str, path: Path, what: str) -> Path:
    if not path.exists():
        raise distillkit.ConfigError("teacher", spec, f"{what}; {path} does not exist")
    return path.resolve()


def require_diffusers_installed(spec: str):
    """The ``diffusers`` module, imported only when a diffusers teacher is asked for."""
    try:
        import diffusers  # noqa: F401  (an optional extra)
    except ImportError:
        raise distillkit.UsageError(
            f"teacher {spec!r} needs the diffusers package: pip install distillkit[diffusers]"
        ) from None
    return diffusers


def files_sha256(paths: Iterable[Path]) -> str:
    """One hash over the named files' names and bytes (a model folder's identity)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_data_shape(spec: str, shape: tuple, num_classes: Optional[int], data) -> None:
    """Refuse a teacher whose images or classes differ from the student's data."""
    if tuple(shape) != tuple(data.shape):
        raise distillkit.ConfigError(
            "teacher", spec, f"a teacher of data shaped like the student's {tuple(data.shape)}; this one takes {tuple(shape)}"
        )
    if num_classes != data.num_classes:
        def describe(n):
            return "unconditional" if n is None else f"{n} classes"
        raise distillkit.ConfigError(
            "teacher", spec,
            f"a teacher with the student data's labels ({describe(data.num_classes)}); this one is {describe(num_classes)}",
        )
