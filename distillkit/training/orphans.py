"""Runs that died before their first checkpoint, and the ``--resume auto`` run that supersedes them.

A run folder records who trains in it (``run.json``: the config identity, the MLflow run id and
tracking URI, the process id and host) as soon as it is created. A folder of the same config
identity with no ``checkpoint.pt``, no ``finished.json`` and no live process is an orphan: its
process was killed before it saved anything (maybe in the middle of its first checkpoint write,
which leaves a ``.tmp`` file). ``--resume auto`` has nothing to resume there and starts a new run;
it then marks the orphan's MLflow run FAILED, with the tag ``distillkit.superseded_by`` saying why,
and removes the orphan's temporary files, so that no run stays RUNNING forever.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

MARKER = "run.json"
#: tag set on an orphaned MLflow run: the run that superseded it and why
TAG = "distillkit.superseded_by"


def write_marker(output_dir: Path, identity: str, run_id: Optional[str], tracking_uri: str) -> None:
    from ..files import write_atomic

    record = {"config_identity": identity, "run_id": run_id, "tracking_uri": tracking_uri,
              "pid": os.getpid(), "host": socket.gethostname()}
    write_atomic(output_dir / MARKER, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))


def _alive(record: dict) -> bool:
    """Whether the process that wrote ``record`` still runs (on another host: assumed so)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def find_orphans(runs_dir: Path, identity: str) -> list[Path]:
    """Run folders of this config identity whose process died before their first checkpoint."""
    from .trainer import FINISHED_MARKER

    orphans = []
    for marker in sorted((runs_dir / "runs").glob(f"*/{MARKER}")):
        folder = marker.parent
        if (folder / "checkpoint.pt").exists() or (folder / FINISHED_MARKER).exists():
            continue
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if record.get("config_identity") == identity and not record.get("superseded_by") and not _alive(record):
            orphans.append(folder)
    return orphans


def temporary_files(folder: Path) -> list[Path]:
    """What interrupted atomic writes leave in a run folder (``files.write_atomic``'s names)."""
    return [*(folder / "checkpoints").glob(".*.tmp"), *folder.glob(".checkpoint.pt.*"), *folder.glob(".*.tmp")]


def supersede(folder: Path, by: str) -> str:
    """Mark the orphan in ``folder`` as superseded by run ``by``: its MLflow run FAILED (when it is
    still RUNNING) with the reason as a tag, its temporary files removed. Returns the reason."""
    from ..files import write_atomic

    marker = folder / MARKER
    record = json.loads(marker.read_text())
    reason = f"killed before its first checkpoint; `distillkit run --resume auto` started {by} in its place"
    if record.get("run_id") and record.get("tracking_uri"):
        from ..tracking import fail_orphaned_run

        fail_orphaned_run(record["tracking_uri"], record["run_id"], TAG, reason)
    for leftover in temporary_files(folder):
        leftover.unlink(missing_ok=True)
    record["superseded_by"] = by
    write_atomic(marker, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    return reason
