"""Experiment tracking behind a small interface: MLflow for real runs, a null tracker for tests.

MLflow is imported only when a tracked run starts: it is slow to import and the rest of the CLI
(``plugins``, ``--dry-run``, errors) should answer at once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Protocol

from .errors import UsageError

# MLflow refuses batches of more than 100 params; keys and values have length limits.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000


class Tracker(Protocol):
    run_id: Optional[str]

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_image(self, path: str | Path, key: str, step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records what it is given in memory (tests read it back); writes nothing."""

    def __init__(self) -> None:
        self.run_id: Optional[str] = None
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.artifacts: list[tuple[str, Optional[str]]] = []
        self.images: list[tuple[str, str, int]] = []
        self.tags: dict[str, str] = {}
        self.status: Optional[str] = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        self.images.append((str(path), key, step))

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status


def resolve_tracking_uri(explicit: str, runs_dir: Path) -> str:
    """``--tracking-uri`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<runs_dir>/mlflow.db``."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{runs_dir / 'mlflow.db'}"


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any work, when a tracking server does not answer (MLflow's own
    client would retry with back-off for minutes)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered: a server that has no /health page is still reachable
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"tracking server {tracking_uri} is unreachable ({reason})") from None


def ui_command(tracking_uri: str) -> str:
    """The command that shows runs of this store in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


class MlflowTracker:
    """One MLflow run, through an explicit ``MlflowClient`` (no global fluent state).

    The experiment is created with an explicit artifact location under the runs directory, so
    artifacts never land relative to whatever the current directory happens to be.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: Path,
        run_name: Optional[str] = None,
        tags: Optional[dict[str, str]] = None,
        run_id: Optional[str] = None,
    ) -> None:
        """Start a new run, or re-attach to ``run_id`` (resume: its params are not logged again)."""
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as exc:  # pragma: no cover - mlflow is a dependency
            raise UsageError(f"MLflow is not installed: {exc}") from None
        self.tracking_uri = tracking_uri
        check_reachable(tracking_uri)
        # Creating a new store logs its schema migrations at INFO: noise in a user's terminal.
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            self._client = MlflowClient(tracking_uri=tracking_uri)
            if run_id is not None:
                run = self._client.get_run(run_id)
                experiment_id = run.info.experiment_id
                self._client.update_run(run_id, status="RUNNING")
            else:
                found = self._client.get_experiment_by_name(experiment)
                if found is None:
                    experiment_id = self._client.create_experiment(
                        experiment, artifact_location=artifact_root.resolve().as_uri()
                    )
                else:
                    experiment_id = found.experiment_id
                run = self._client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        except MlflowException as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot use MLflow tracking store {tracking_uri}: {first_line}") from None
        self.experiment_id = experiment_id
        self.run_id: Optional[str] = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:_MAX_PARAM_LENGTH]) for key, value in sorted(params.items())]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """An image with a step, so the MLflow UI shows its history with a slider."""
        from PIL import Image

        with Image.open(path) as image:
            self._client.log_image(self.run_id, image.copy(), key=key, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, status=status)


def fail_orphaned_run(tracking_uri: str, run_id: str, tag: str, reason: str) -> None:
    """End a run whose process died without ending it (still RUNNING) as FAILED, tagged with why.
    A store that cannot be reached or no longer has the run is left alone: this is cleanup."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, tag, reason)
            client.set_terminated(run_id, status="FAILED")
    except MlflowException:
        pass
