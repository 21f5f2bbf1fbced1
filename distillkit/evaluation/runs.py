"""Finding a trained run to evaluate, and logging an evaluation back to its MLflow run."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Optional

import attrs
import torch

from ..arguments import check_device, first_line
from ..errors import UsageError

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@attrs.frozen
class OpenedRun:
    trained: object  # distillkit.trained.TrainedModel
    run_id: Optional[str]
    tracking_uri: str
    runs_dir: Path
    device: torch.device


def _sqlite_file(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def store_exists(uri: str) -> bool:
    """False for an SQLite store whose file is missing (opening it would create an empty one)."""
    path = _sqlite_file(uri)
    return path is None or path.is_file()


def open_run(reference: str, *, runs_dir: str, tracking_uri: str, weights: str, device: str) -> OpenedRun:
    """Load a run's network: ``reference`` is a checkpoint file, a folder name under
    ``<runs_dir>/runs`` (tracked or ``--no-track`` runs), or an MLflow run id whose checkpoint is
    then read from the run's artifacts; a run id may be given as an unambiguous prefix (``compare``
    prints 8 characters). One-line ``UsageError`` when it is none of these."""
    from ..run_ids import expand_run_id
    from ..tracking import check_reachable, resolve_tracking_uri

    if tracking_uri:  # a malformed or unusable store: one line at once, not MLflow's retries
        check_reachable(tracking_uri)
    reference = expand_run_id(reference, runs_dir=runs_dir, tracking_uri=tracking_uri, option="--run")
    from ..trained import find_checkpoint, load_trained_model
    from ..training.checkpoint import load_checkpoint

    torch_device = check_device(device)
    root = Path(runs_dir).expanduser().resolve()
    uri = resolve_tracking_uri(tracking_uri, root)
    file = Path(reference).expanduser()
    local = root / "runs" / reference / "checkpoint.pt"
    run_id: Optional[str] = reference if _RUN_ID.match(reference) else None
    if file.is_file():
        path = file.resolve()
        run_id = load_checkpoint(path).get("run_id")
    elif reference and "/" not in reference and local.is_file():
        path = local
    elif run_id is not None:
        if not store_exists(uri):
            raise UsageError(f"--run={reference}: no run folder {root / 'runs' / reference} and no MLflow store at "
                             f"{_sqlite_file(uri)} (pass the run's --runs-dir or --tracking-uri)")
        found = find_checkpoint(reference, runs_dir=root, tracking_uri=uri)
        assert found is not None
        path = found[0]
    else:
        raise UsageError(f"--run={reference!r}: not a checkpoint file, not a run folder under {root / 'runs'}, "
                         f"and not an MLflow run id")
    trained = load_trained_model(path, weights=weights, device=torch_device)
    return OpenedRun(trained, run_id, uri, root, torch_device)


def check_run_in_store(run_id: Optional[str], tracking_uri: str, reference: str) -> None:
    """Fail before any work when the results could not be logged to the run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if run_id is None:
        raise UsageError(f"--run={reference}: this checkpoint belongs to no MLflow run (trained with --no-track); "
                         f"add --no-log to evaluate it without logging")
    if not store_exists(tracking_uri):
        raise UsageError(f"run {run_id}: no MLflow store at {_sqlite_file(tracking_uri)}; pass the run's --runs-dir "
                         f"or --tracking-uri, or --no-log")
    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise UsageError(f"run {run_id} cannot be read from {tracking_uri}: {first_line(exc)}; pass --no-log to "
                         f"evaluate without logging") from None


def log_evaluation(result, run_id: str, tracking_uri: str, step: int) -> None:
    """Log metrics, protocol artifacts and tags of an ``EvalResult`` to the existing run
    ``run_id``, without touching its params; its status and end time are put back as they were."""
    from mlflow.tracking import MlflowClient

    from ..tracking import MlflowTracker

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    info = run.info
    tracker = MlflowTracker(tracking_uri, "unused-on-reattach", Path("."), run_id=run_id)
    try:
        tracker.log_metrics(result.metrics(), step=step)
        with tempfile.TemporaryDirectory(prefix="distillkit-eval-") as scratch:
            for metric, artifact in result.protocol_artifacts().items():
                path = Path(scratch) / Path(artifact).name
                path.write_text(json.dumps(result.metric_protocol(metric), indent=2, default=str) + "\n")
                tracker.log_artifact(path, str(Path(artifact).parent))
        tracker.set_tags(result.tags(run.data.tags))
    finally:
        if info.status != "RUNNING":
            client.set_terminated(run_id, status=info.status, end_time=info.end_time)
