"""The MLflow store: concurrent creation, bad tracking URIs that must fail fast in one line, the
experiment kind MLflow 3's UI reads, and the quoted ``mlflow ui`` command."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distillkit.cli.main import main

BIN = Path(sys.executable).parent
SMALL = ["--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--nfe", "1", "--quiet"]


def test_four_runs_started_at_once_on_a_fresh_sqlite_store_all_finish(tmp_path):
    """Without the store lock, the four processes migrate the new database together and all but
    (at best) one die in alembic ("Online migration expected ...", "duplicate column name")."""
    from mlflow.tracking import MlflowClient

    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([str(BIN / "distillkit"), "run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "5",
                          "--batch-size", "8", "--seed", str(seed), "--runs-dir", str(tmp_path), *SMALL],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for seed in (1, 2, 3, 4)
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [o[1][-1500:] for o in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("distillkit").experiment_id])
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2", "3", "4"]
    assert [r.info.status for r in runs] == ["FINISHED"] * 4


def _run_with_uri(uri, tmp_path, capsys):
    started = time.monotonic()
    code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "1", "--tracking-uri", uri,
                 "--runs-dir", str(tmp_path / "runs"), *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, time.monotonic() - started


def test_malformed_http_uri_is_one_line(tmp_path, capsys):
    code, err, _ = _run_with_uri("http://[::1", tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "is not a valid URL" in err[0] and "http://[::1" in err[0]
    assert not (tmp_path / "runs").exists()


def test_sqlite_file_that_is_not_a_database_is_one_line(tmp_path, capsys):
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database\n" * 100)
    code, err, _ = _run_with_uri(f"sqlite:///{bogus}", tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "is not an SQLite database" in err[0] and str(bogus) in err[0]
    assert bogus.read_text().startswith("these are my notes")  # untouched
    assert not (tmp_path / "runs").exists()


def test_sqlite_store_where_no_file_can_be_created_fails_fast(tmp_path, capsys):
    """``/proc`` cannot hold a file, even for root; MLflow would retry for about two minutes."""
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    code, err, seconds = _run_with_uri("sqlite:////proc/distillkit-x.db", tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "cannot be created" in err[0] and "/proc" in err[0]
    assert seconds < 20


def test_sqlite_uri_without_a_file_is_one_line(tmp_path, capsys):
    code, err, _ = _run_with_uri("sqlite:///", tmp_path, capsys)
    assert code == 2 and len(err) == 1 and "names no database file" in err[0]


def test_an_existing_store_still_passes_the_check(tmp_path):
    from distillkit.tracking import check_reachable

    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()  # creates and migrates it
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # no error
    check_reachable(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # not made yet: left to be created


def test_experiments_are_marked_as_model_training_for_mlflow_3s_ui(tmp_path):
    """MLflow 3's UI opens an experiment without this tag in its GenAI view ("Evaluation runs",
    traces); ``custom_model_development`` opens its "Model training" view."""
    from mlflow.tracking import MlflowClient

    from distillkit.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "fresh", tmp_path / "artifacts")
    tracker.finish()
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("fresh").tags["mlflow.experimentKind"] == "custom_model_development"
    # An experiment made before the tag existed is marked when a run is next started in it.
    old_id = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    MlflowTracker(uri, "old", tmp_path / "artifacts").finish()
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_printed_mlflow_ui_command_survives_spaces_in_the_path(tmp_path):
    from distillkit.tracking import ui_command

    uri = f"sqlite:///{tmp_path / 'my runs' / 'mlflow.db'}"
    words = shlex.split(ui_command(uri))
    assert words[:3] == ["mlflow", "ui", "--backend-store-uri"] and words[3] == uri


def test_the_printed_address_opens_the_model_training_view(tmp_path, capsys):
    """MLflow 3.17 chooses its view from ``?workflowType=`` (else the browser's last choice, GenAI
    by default): the run's report prints a link to the experiment with the training view."""
    from mlflow.tracking import MlflowClient

    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "1", "--batch-size", "8",
                 "--runs-dir", str(tmp_path), *SMALL]) == 0
    out = capsys.readouterr().out
    run_id = out.split("MLflow run: ")[1].split()[0]
    experiment_id = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.experiment_id
    assert f"then open http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning" in out


@pytest.mark.parametrize("command", [
    ["eval", "--run", "abcd1234"],
    ["sample", "--run", "abcd1234", "--out", "grid.png"],
    ["compare", "--methods", "fm", "--dataset", "toy2d", "--budget-images", "64"],
])
def test_every_command_checks_the_store_first(tmp_path, capsys, command):
    bogus = tmp_path / "notes.db"
    bogus.write_text("not a database\n" * 50)
    for uri, message in ((f"sqlite:///{bogus}", "is not an SQLite database"), ("http://[::1", "is not a valid URL")):
        code = main([*command, "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
