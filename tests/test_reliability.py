"""Reliability: non-finite losses, unreachable servers, concurrent runs, random SIGKILLs."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillkit import LossOutput, Method, hookimpl
from distillkit import plugin_manager
from distillkit.cli.main import main
from distillkit.training.checkpoint import load_checkpoint

BIN = Path(sys.executable).parent
SMALL = ["--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--nfe", "1", "--quiet"]


class NaNAtStep3(Method):
    """Plain flow matching whose loss turns NaN at step 3 (0-based step 2)."""

    name = "nan-at-3"

    def loss(self, student, batch, generator, step):
        x0 = batch.x
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.rand(x0.shape[0], generator=generator)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = torch.nn.functional.mse_loss(student(x_t, t), eps - x0)
        return LossOutput(loss * float("nan") if step == 2 else loss)


class NaNPlugin:
    @staticmethod
    @hookimpl
    def distillkit_register_methods(register):
        register(NaNAtStep3)


@pytest.fixture
def nan_plugin(monkeypatch):
    monkeypatch.setattr(plugin_manager, "_STATE", plugin_manager.load_plugins([("nan-plugin", NaNPlugin)]))


def test_nan_loss_stops_keeps_last_good_checkpoint_and_marks_run_failed(nan_plugin, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    code = main(["run", "--method", "nan-at-3", "--dataset", "toy2d", "--max-steps", "10", "--batch-size", "16",
                 "--checkpoint-every", "1", "--runs-dir", str(tmp_path), *SMALL])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distillkit: error")]
    assert code == 1
    assert len(errors) == 1 and "non-finite loss at step 3" in errors[0] and "train.nonfinite=skip" in errors[0]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2  # the last good one
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_dir.name)
    assert run.info.status == "FAILED"


def test_nan_loss_can_be_skipped_and_counted(nan_plugin, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    code = main(["run", "--method", "nan-at-3", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
                 "--set", "train.nonfinite=skip", "--set", "train.log_every=1", "--runs-dir", str(tmp_path), *SMALL])
    assert code == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = {m.step: m.value for m in client.get_metric_history(run_dir.name, "train/skipped_steps")}
    assert history[2] == 0 and history[3] == 1 and history[6] == 1
    weights = load_checkpoint(run_dir / "checkpoint.pt")["student"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_unreachable_tracking_server_fails_fast_and_writes_nothing(tmp_path, capsys):
    started = time.time()
    code = main(["run", "--tracking-uri", "http://127.0.0.1:9", "--runs-dir", str(tmp_path / "runs"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tracking server http://127.0.0.1:9 is unreachable" in err[0]
    assert time.time() - started < 30
    assert not (tmp_path / "runs").exists()


def test_two_runs_logging_to_one_sqlite_store_at_once_both_complete(tmp_path):
    from mlflow.tracking import MlflowClient

    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Create the store first: two processes racing to create (migrate) a new database is a
    # different problem from two runs logging to one.
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "1", "--batch-size", "8",
                 "--runs-dir", str(tmp_path), *SMALL]) == 0
    procs = [
        subprocess.Popen([str(BIN / "distillkit"), "run", "--method", method, "--dataset", "toy2d",
                          "--max-steps", "120", "--batch-size", "32", "--set", "train.log_every=1",
                          "--runs-dir", str(tmp_path), *SMALL], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for method in ("fm", "cud")
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("distillkit").experiment_id])
            if r.data.params.get("train.max_steps") == "120"]
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 120
        assert "eval/energy/nfe1" in run.data.metrics


def test_random_sigkills_then_resume_auto_end_with_the_uninterrupted_weights(tmp_path):
    """Kill the same command at random moments and restart it with --resume auto until it finishes.
    The defaults decide when checkpoints are written (by the clock, train.checkpoint_minutes; no
    checkpoint_every), with the interval shortened through the config to 0.12 s, so that many kills
    land in the middle of a write. 1500 steps: clock checkpoints cost little, so a shorter run
    finishes on a quiet machine before a second kill lands."""
    args = ["run", "--method", "fm", "--dataset", "toy2d", "--set", "dataset_options.train_size=320",
            "--batch-size", "32", "--max-steps", "1500", "--set", "train.checkpoint_minutes=0.002", "--no-track", *SMALL]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run([str(BIN / "distillkit"), *args, "--runs-dir", str(tmp_path / "whole")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    killed_runs = tmp_path / "killed"
    chooser = random.Random(1234)

    def newest_step() -> int:
        steps = [int(p.stem[5:]) for p in killed_runs.glob("runs/*/checkpoints/step-*.pt")]
        return max(steps, default=0)

    kills, finished, budget = 0, False, time.time() + 480  # start-up alone takes ~30 s on a loaded 2-core machine
    while not finished and time.time() < budget:
        before = newest_step()
        proc = subprocess.Popen([str(BIN / "distillkit"), *args, "--runs-dir", str(killed_runs), "--resume", "auto"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill at a random moment after the process has made some progress (start-up time varies
        # with the machine's load); checkpoints come every 0.12 s, so many kills land mid-write.
        while proc.poll() is None and newest_step() <= before and time.time() < budget:
            time.sleep(0.02)
        try:
            # After 6 kills the run is left to finish: on a loaded machine each restart costs ~30 s.
            proc.wait(timeout=chooser.uniform(0.0, 1.5) if kills < 6 else max(budget - time.time(), 1.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        finished = True
    assert finished, f"did not finish within the time budget after {kills} kills"
    assert kills >= 2, "the test should have interrupted the run several times"
    # Exactly one run: a kill after the run finished must not make --resume auto start another.
    done = [p for p in killed_runs.glob("runs/*/checkpoint.pt") if load_checkpoint(p)["step"] == 1500]
    assert len(done) == 1
    a = load_checkpoint(next((tmp_path / "whole").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(done[0])
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
