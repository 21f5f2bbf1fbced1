"""Run ids given as an unambiguous prefix, the way ``git`` takes a short commit hash.

``distillkit compare`` prints 8-character run ids; every option that takes a run id (``eval
--run``, ``sample --run``, ``run --resume``, ``--teacher``) accepts such a prefix. A prefix is
looked up among the run folders under ``<runs_dir>/runs`` (every tracked run has one, named by
its id), then, when none matches there, among the runs of the MLflow store.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: A shorter hex string is taken as a prefix; as in git, at least 4 characters.
_PREFIX = re.compile(r"^[0-9a-f]{4,31}$")


def expand_run_id(reference: str, *, runs_dir: str | Path, tracking_uri: str = "", option: str = "--run") -> str:
    """The full run id ``reference`` is a prefix of, or ``reference`` unchanged when it is not a
    short hex string, or names an existing file or run folder. One-line ``UsageError`` when no
    run, or more than one, starts with it."""
    root = Path(runs_dir).expanduser()
    if not _PREFIX.match(reference or "") or Path(reference).expanduser().exists() or (root / "runs" / reference).exists():
        return reference
    matches = _local_ids(root, reference)
    where = str(root / "runs")
    if not matches:
        from .tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri, root.resolve())
        matches = _store_ids(uri, reference)
        where += f" or {uri}"
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UsageError(f"{option}={reference}: no run id starts with {reference!r} (looked in {where})")
    shown = ", ".join(sorted(matches)[:5]) + (", ..." if len(matches) > 5 else "")
    raise UsageError(f"{option}={reference}: ambiguous, {len(matches)} run ids start with it ({shown}); "
                     f"give more characters")


def _local_ids(root: Path, prefix: str) -> list[str]:
    folder = root / "runs"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and RUN_ID.match(p.name) and p.name.startswith(prefix))


def _store_ids(tracking_uri: str, prefix: str) -> list[str]:
    """Run ids of the store that start with ``prefix``; none when the store does not exist (an
    SQLite file is not created to be searched) or cannot be read."""
    from .tracking import sqlite_file

    path = sqlite_file(tracking_uri)
    if path is not None and not path.is_file():
        return []
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        found, token = [], None
        while experiments:
            page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
            found.extend(run.info.run_id for run in page if run.info.run_id.startswith(prefix))
            token = page.token
            if not token:
                break
    except MlflowException:
        return []
    return sorted(found)
