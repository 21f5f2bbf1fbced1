"""Files that are written whole or not at all, and data generated once and cached beside a run.

Public API (plugins import these from ``distillkit``):

``write_atomic(path, write)``
    ``write(tmp)`` fills a temporary file beside ``path``; it is flushed to disk, given the usual
    permissions (0o666 less the umask) and renamed over ``path``. A crash or an error at any point
    leaves the previous ``path`` (or none) and no temporary file: rename is atomic on POSIX, and
    processes writing the same file never interleave.
``save_atomic(payload, path)``
    ``torch.save`` through ``write_atomic``: checkpoints, pairs, trajectories.
``generate_once(path, identity, generate, *, read=load_payload, log_artifact=None)``
    Teacher-generated data (reflow pairs, CUD stage-2 trajectories) made once and reused by a
    resumed run: the file is reused only when it records ``identity`` (who made it, how); anything
    else (another teacher or config, an unreadable file) is generated again and saved atomically.
``read_cached(path, identity, *, read=load_payload)``
    ``(payload, "")`` when ``path`` holds data made for ``identity``, else ``(None, why)``: for a file
    the user names, which is refused with ``why`` instead of being regenerated.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch


def _current_umask() -> int:
    # Read once, at import: os.umask can only be read by setting it, and setting it while another
    # thread creates a file would give that file the wrong permissions.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _current_umask()


def _flush_to_disk(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: str | Path, write: Callable[[Path], None], *, temporary_suffix: Optional[str] = None) -> Path:
    """Create ``path`` through ``write(tmp)`` on a temporary file in the same folder, then rename.

    The temporary file is ``.<name>.<random><suffix>``; ``suffix`` defaults to ``path``'s own, so
    writers that pick the format from the file name (matplotlib's ``savefig``) see the right one.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if temporary_suffix is None else temporary_suffix
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        _flush_to_disk(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0o600; a plain open would not
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def save_atomic(payload: Any, path: str | Path) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (``write_atomic``); returns ``path``.

    The temporary file ends in ``.tmp`` (``.<name>.<random>.tmp``), the pattern the trainer clears
    after a kill.
    """

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as stream:
            recording = _WriteErrors(stream)
            try:
                torch.save(payload, recording)
            except RuntimeError:
                # torch's zip writer turns a failed write (a full disk) into "unexpected pos":
                # the OSError underneath says what happened.
                if recording.error is not None:
                    raise recording.error from None
                raise

    return write_atomic(path, write, temporary_suffix=".tmp")


class _WriteErrors:
    """A binary stream that remembers the first ``OSError`` its writes raised."""

    def __init__(self, stream) -> None:
        self.stream, self.error = stream, None

    def write(self, data) -> int:
        try:
            return self.stream.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.stream.flush()

    @property
    def name(self) -> str:
        """The file's path, as the wrapped stream has it (for callers that name what they write)."""
        return self.stream.name


# ------------------------------------------------------------------------------------------------
# generated once, cached with an identity check


def load_payload(path: str | Path) -> Any:
    """A ``torch.save``d file read safely (``weights_only=True``) onto the CPU."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def identity_mismatch(payload: Any, identity: Mapping[str, Any]) -> str:
    """"" when ``payload`` records every key of ``identity`` with the same value, else the first
    difference: "is not a FORMAT file" for the key ``format``, "has KEY = FOUND, this run needs
    WANTED" for any other."""
    if not isinstance(payload, Mapping):
        return f"is not a {identity.get('format', 'distillkit data')} file"
    for key, wanted in identity.items():
        found = payload.get(key)
        if found != wanted:
            return f"is not a {wanted} file" if key == "format" else f"has {key} = {found!r}, this run needs {wanted!r}"
    return ""


def read_cached(
    path: str | Path, identity: Mapping[str, Any], *, read: Callable[[Path], Any] = load_payload
) -> tuple[Optional[dict], str]:
    """``(payload, "")`` when ``read(path)`` records ``identity``, else ``(None, why)``: "cannot be
    read (ErrorType)" when ``read`` raises, or ``identity_mismatch``'s reason."""
    try:
        payload = read(Path(path))
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not a torch file, refused by read
        return None, f"cannot be read ({type(exc).__name__})"
    why = identity_mismatch(payload, identity)
    return (None, why) if why else (payload, "")


def generate_once(
    path: str | Path,
    identity: Mapping[str, Any],
    generate: Callable[[], Mapping[str, Any]],
    *,
    read: Callable[[Path], Any] = load_payload,
    log_artifact: Optional[Callable[[Path], Any]] = None,
) -> dict:
    """The data at ``path`` if it was made for ``identity``; else ``generate()``, saved there.

    Generated data are saved as ``{**generate(), **identity}`` (so the file records who made it
    and how) with ``save_atomic``, and ``log_artifact(path)`` is called; reused data are not
    logged again. ``read`` may check or complete what it reads; when it raises, or the file
    records another identity (another teacher, other options), the data are generated again.
    """
    path = Path(path)
    if path.is_file():  # a resumed run: what it generated before
        payload, _ = read_cached(path, identity, read=read)
        if payload is not None:
            return payload
    payload = {**generate(), **identity}
    save_atomic(payload, path)
    if log_artifact is not None:
        log_artifact(path)
    return payload
