"""Experiment tracking behind a small interface: MLflow for real runs, a null tracker for tests.

MLflow is imported only when a tracked run starts: it is slow to import and the rest of the CLI
(``plugins``, ``--dry-run``, errors) should answer at once.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shlex
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from .errors import TrackingFailed, UsageError

# MLflow refuses batches of more than 100 params; keys and values have length limits.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000

#: The experiment tag MLflow 3's UI reads to choose between its GenAI view (traces, "Evaluation
#: runs") and its "Model training" view; ``custom_model_development`` is the training one.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

#: How long a process waits for another one creating or migrating the same SQLite store.
STORE_LOCK_TIMEOUT_S = 600.0


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


def sqlite_file(tracking_uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI (None for any other kind of store)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].partition("?")[0]
    return Path(path) if path else None


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, before any work, when the tracking store cannot be used: a server that
    does not answer or a malformed URL (MLflow's own client would retry with back-off for
    minutes), or a SQLite file that cannot be opened or is not a database."""
    if tracking_uri.startswith("sqlite:"):
        _check_sqlite(tracking_uri)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        parts = urllib.parse.urlsplit(tracking_uri)
        parts.port  # noqa: B018  (parsing the port is what finds a malformed one)
        if not parts.hostname:
            raise ValueError("no host")
    except ValueError as exc:
        raise UsageError(f"tracking URI {tracking_uri!r} is not a valid URL ({exc})") from None
    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered: a server that has no /health page is still reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"tracking server {tracking_uri} is unreachable ({reason})") from None


def _check_sqlite(tracking_uri: str) -> None:
    """Open the store's file read-only with the standard library, so that a file that is not a
    database, or a place no database can be written (``/proc``), is one line at once instead of
    MLflow's minutes of retries. A store that does not exist yet is left to be created."""
    path = sqlite_file(tracking_uri)
    if path is None:
        raise UsageError(f"tracking URI {tracking_uri!r} names no database file: use sqlite:///PATH/mlflow.db")
    if not path.exists():
        if path.parent.is_dir() and not _can_create_file_in(path.parent):
            raise UsageError(f"tracking store {path} cannot be created: its folder {path.parent} is not writable")
        return  # its folder is created with the runs directory
    if not path.is_file():
        raise UsageError(f"tracking store {path} is not a file")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            return  # another run is writing it: a database all the same
        raise UsageError(f"tracking store {path} is not an SQLite database ({exc})") from None


def _can_create_file_in(folder: Path) -> bool:
    """Whether a file can really be created in ``folder`` (``os.access`` says yes for root in
    ``/proc``, where nothing can be created)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".distillkit-store-check-"):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold a file lock next to a SQLite store while it is created, migrated and its experiment
    made: MLflow migrates a new database on first use, and two processes migrating one file at
    once break it (alembic "Online migration expected ...", "duplicate column name"). Servers
    and other stores serialise this themselves: no lock."""
    path = sqlite_file(tracking_uri)
    if path is None or not path.parent.is_dir():
        yield
        return
    from filelock import FileLock, Timeout

    try:
        with FileLock(f"{path}.lock", timeout=STORE_LOCK_TIMEOUT_S):
            yield
    except Timeout:
        raise UsageError(f"tracking store {path} stayed locked by another process for "
                         f"{STORE_LOCK_TIMEOUT_S:.0f} s (lock file {path}.lock)") from None


#: MLflow 3.x (3.17 at least) opens the view its "GenAI | Model training" switch is on, from
#: this URL parameter or else the browser's last choice, GenAI by default; the experiment tag is
#: read only by versions without the switch. A link with the parameter opens the training view.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
_UI_ADDRESS = "http://127.0.0.1:5000"


def ui_command(tracking_uri: str) -> str:
    """The command that shows runs of this store in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    # Quoted: a runs directory with a space (or a shell character) in its path must paste as is.
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000"


def ui_url(tracking_uri: str, run_id: Optional[str]) -> Optional[str]:
    """The address of the run's experiment in MLflow's "Model training" view (on the server
    ``ui_command`` starts, or the tracking server itself); None when the run cannot be read."""
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # only a convenience line: never fail a finished run over it
        return None
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else _UI_ADDRESS
    return f"{base}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


#: SQLite's message for SQLITE_FULL, as it reaches us through sqlalchemy and MLflow.
_SQLITE_FULL = "database or disk is full"


def store_is_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is SQLite's full disk."""
    seen: Optional[BaseException] = exc
    for _ in range(16):  # a chain is short; a loop in it must not hang us
        if seen is None:
            return False
        if _SQLITE_FULL in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _FullStoreFilter(logging.Filter):
    """Drops MLflow's own ERROR record (with its traceback) of a full store: the run reports it
    in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _SQLITE_FULL not in record.getMessage()


def _quiet_about_a_full_store(logger: logging.Logger) -> None:
    if not any(isinstance(f, _FullStoreFilter) for f in logger.filters):
        logger.addFilter(_FullStoreFilter())


def _full_store_is_enospc(method):
    """A tracker call that fails on a full store raises ``OSError(ENOSPC)`` naming the store, so
    the trainer reports it in one line as it does a full disk under a checkpoint."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if not store_is_full(exc):
                raise
            raise OSError(errno.ENOSPC, f"the MLflow store is full: {_SQLITE_FULL}",
                          str(sqlite_file(self.tracking_uri) or self.tracking_uri)) from None

    return call


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
            from mlflow.exceptions import MlflowException  # a missing MLflow fails here, in one line
        except ImportError as exc:  # pragma: no cover - mlflow is a dependency
            raise UsageError(f"MLflow is not installed: {exc}") from None
        self.tracking_uri = tracking_uri
        check_reachable(tracking_uri)
        # Creating a new store logs its schema migrations at INFO: noise in a user's terminal.
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        _quiet_about_a_full_store(logging.getLogger("mlflow.store.db.utils"))
        try:
            self._start(experiment, artifact_root, run_name, tags, run_id)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise TrackingFailed(f"cannot start an MLflow run: no space left on the device for the store "
                                 f"{exc.filename}; nothing was trained; free some space and run again") from None
        except MlflowException as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"cannot use MLflow tracking store {tracking_uri}: {first_line}") from None

    @_full_store_is_enospc
    def _start(self, experiment: str, artifact_root: Path, run_name: Optional[str], tags: Optional[dict[str, str]],
               run_id: Optional[str]) -> None:
        from mlflow.tracking import MlflowClient

        with store_lock(self.tracking_uri):
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            if run_id is not None:
                run = self._client.get_run(run_id)
                experiment_id = run.info.experiment_id
                self._client.update_run(run_id, status="RUNNING")
            else:
                experiment_id = self._experiment_id(experiment, artifact_root)
                run = self._client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        self.experiment_id = experiment_id
        self.run_id: Optional[str] = run.info.run_id

    def _experiment_id(self, experiment: str, artifact_root: Path) -> str:
        """The experiment's id, made if it does not exist yet, and marked as model training."""
        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = self._client.create_experiment(
                experiment, artifact_location=artifact_root.resolve().as_uri(),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        else:
            experiment_id = found.experiment_id
            if EXPERIMENT_KIND_TAG not in found.tags:  # an experiment made before the tag was set
                self._client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment_id

    @_full_store_is_enospc
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:_MAX_PARAM_LENGTH]) for key, value in sorted(params.items())]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=items[start : start + _PARAMS_PER_BATCH])

    @_full_store_is_enospc
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    @_full_store_is_enospc
    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    @_full_store_is_enospc
    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    @_full_store_is_enospc
    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """An image with a step, so the MLflow UI shows its history with a slider."""
        from PIL import Image

        with Image.open(path) as image:
            self._client.log_image(self.run_id, image.copy(), key=key, step=step)

    @_full_store_is_enospc
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
