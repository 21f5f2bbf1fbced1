"""Reliability of a training run: nothing lost by default (checkpoints by the clock and on
SIGINT/SIGTERM), non-finite weights stop a run, checkpoints that cannot be resumed, a full disk,
runs orphaned before their first checkpoint. docs/reliability.md lists what each test proves."""

import contextlib
import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from distillkit import LossOutput, Method, hookimpl
from distillkit import plugin_manager
from distillkit.cli.main import main
from distillkit.training.checkpoint import load_checkpoint

BIN = Path(sys.executable).parent
SMALL = ["--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--nfe", "1", "--quiet"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _fm_loss(student, batch, generator):
    x0 = batch.x
    eps = torch.randn(x0.shape, generator=generator)
    t = torch.rand(x0.shape[0], generator=generator)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    return torch.nn.functional.mse_loss(student(x_t, t), eps - x0)


class NaNWeightsAtStep6(Method):
    """Flow matching whose update of step 6 (0-based 5) leaves a NaN weight behind, with a finite
    loss and gradient: what an optimizer step that overflows does."""

    name = "nan-weights-at-6"

    def loss(self, student, batch, generator, step):
        return LossOutput(_fm_loss(student, batch, generator))

    def after_step(self, student, step):
        if step == 5:
            with torch.no_grad():
                next(student.parameters()).view(-1)[0] = float("nan")


class NaNGradientAtStep3(Method):
    """Flow matching whose loss at step 3 (0-based 2) stays finite while its gradient is NaN:
    sqrt has an infinite derivative at 0, and 0 x inf is NaN."""

    name = "nan-gradient-at-3"

    def loss(self, student, batch, generator, step):
        loss = _fm_loss(student, batch, generator)
        if step == 2:
            zero = sum(p.sum() for p in student.parameters()) * 0.0
            loss = loss + torch.sqrt(zero)  # value + 0, gradient NaN
        return LossOutput(loss)


class NaNLossAtStep3(Method):
    name = "nan-loss-at-3"

    def loss(self, student, batch, generator, step):
        loss = _fm_loss(student, batch, generator)
        return LossOutput(loss * float("nan") if step == 2 else loss)


class FaultPlugin:
    @staticmethod
    @hookimpl
    def distillkit_register_methods(register):
        register(NaNWeightsAtStep6)
        register(NaNGradientAtStep3)
        register(NaNLossAtStep3)


@pytest.fixture
def faults(monkeypatch):
    monkeypatch.setattr(plugin_manager, "_STATE", plugin_manager.load_plugins([("fault-plugin", FaultPlugin)]))


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("distillkit: error")]


def _status(runs_dir: Path, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{runs_dir / 'mlflow.db'}").get_run(run_id).info.status


# ------------------------------------------------------------------------------------------------
# non-finite weights, gradients, skipped steps


def test_nan_weights_after_the_last_update_fail_the_run_and_keep_the_last_good_checkpoint(faults, tmp_path, capsys):
    code = main(["run", "--method", "nan-weights-at-6", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
                 "--checkpoint-every", "4", "--runs-dir", str(tmp_path), *SMALL])
    errors = _errors(capsys)
    assert code == 1
    assert len(errors) == 1 and "non-finite weights after the update of step 6" in errors[0], errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["step"] == 4 and str(run_dir / "checkpoint.pt") in errors[0]
    assert all(torch.isfinite(w).all() for w in checkpoint["student"].values())
    assert not (run_dir / "finished.json").exists() and not (run_dir / "samples.png").exists()
    assert _status(tmp_path, run_dir.name) == "FAILED"


def test_nan_weights_fail_the_run_under_nonfinite_skip_too(faults, tmp_path, capsys):
    code = main(["run", "--method", "nan-weights-at-6", "--dataset", "toy2d", "--max-steps", "8", "--batch-size", "16",
                 "--set", "train.nonfinite=skip", "--runs-dir", str(tmp_path), *SMALL])
    errors = _errors(capsys)
    assert code == 1 and len(errors) == 1 and "non-finite weights after the update of step 6" in errors[0], errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert _status(tmp_path, run_dir.name) == "FAILED"


def test_nan_gradient_with_a_finite_loss_stops_the_run_naming_the_gradient(faults, tmp_path, capsys):
    code = main(["run", "--method", "nan-gradient-at-3", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
                 "--checkpoint-every", "1", "--runs-dir", str(tmp_path), *SMALL])
    errors = _errors(capsys)
    assert code == 1
    assert len(errors) == 1 and "non-finite gradient at step 3" in errors[0], errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2


def test_nan_gradient_is_skipped_under_nonfinite_skip_and_the_weights_stay_finite(faults, tmp_path, capsys):
    code = main(["run", "--method", "nan-gradient-at-3", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
                 "--set", "train.nonfinite=skip", "--runs-dir", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped 1 non-finite step (train.nonfinite=skip): step 3" in out, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["skipped_at"] == [3]
    assert all(torch.isfinite(w).all() for w in checkpoint["student"].values())


def test_skipped_nan_loss_steps_are_reported_at_the_end(faults, tmp_path, capsys):
    code = main(["run", "--method", "nan-loss-at-3", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
                 "--set", "train.nonfinite=skip", "--no-track", "--runs-dir", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert code == 0 and "skipped 1 non-finite step (train.nonfinite=skip): step 3" in out, out


# ------------------------------------------------------------------------------------------------
# checkpoints by the clock, on SIGINT / SIGTERM


def test_a_checkpoint_every_ten_minutes_is_the_default():
    from distillkit.config import TrainConfig

    assert TrainConfig().checkpoint_minutes == 10.0


def test_checkpoints_by_the_clock_without_checkpoint_every(tmp_path):
    from distillkit.config import run_config_from_dict
    from distillkit.plugin_manager import get_registries
    from distillkit.resolve import resolve
    from distillkit.tracking import NullTracker
    from distillkit.training.trainer import train

    tree = {"method": "fm", "dataset": "toy2d", "device": "cpu",
            "train": {"max_steps": 30, "batch_size": 16, "checkpoint_minutes": 1e-9, "keep_last": 100},
            "sample": {"num_samples": 16, "nfe": [1], "reference_steps": 1}}
    train(resolve(run_config_from_dict(tree), get_registries()), NullTracker(), tmp_path, progress=False)
    steps = sorted(int(p.stem[5:]) for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert steps == list(range(1, 31))  # an interval shorter than a step: one checkpoint per step
    tree["train"]["checkpoint_minutes"] = 0.0  # 0 turns the clock off: only the final checkpoint
    train(resolve(run_config_from_dict(tree), get_registries()), NullTracker(), tmp_path / "off", progress=False)
    assert [p.name for p in (tmp_path / "off" / "checkpoints").glob("step-*.pt")] == ["step-00000030.pt"]


# Long enough that a run signalled or killed after its first checkpoint is still training on a
# fast idle machine (400 steps of this net once finished within the test's wait).
STEPS = 1500


def _untracked_run(runs_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [str(BIN / "distillkit"), "run", "--method", "fm", "--dataset", "toy2d", "--batch-size", "32",
            "--max-steps", str(max_steps), "--no-track", "--runs-dir", str(runs_dir), *SMALL, *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = tmp_path_factory.mktemp("whole")
    done = subprocess.run(_untracked_run(runs, STEPS), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return load_checkpoint(next(runs.glob("runs/*/checkpoint.pt")))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_a_step_boundary_and_the_printed_command_resumes_exactly(signum, uninterrupted, tmp_path):
    runs = tmp_path / "runs"
    args = _untracked_run(runs, STEPS, "--checkpoint-every", "100")  # the first checkpoint: training is under way
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(runs.glob("runs/*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it was signalled"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    (line,) = [line for line in err.splitlines() if "interrupted" in line]
    name = signal.Signals(signum).name
    assert line.startswith(f"distillkit: interrupted by {name} at step ") and "saved checkpoint" in line, line
    (run_dir,) = runs.glob("runs/*")
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert 100 <= saved["step"] < STEPS and f"(step {saved['step']})" in line
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == ["distillkit", "run", "--resume"] and Path(command[3]) == run_dir / "checkpoint.pt"
    resumed = subprocess.run([str(BIN / "distillkit"), *command[1:], "--quiet"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {saved['step']}" in resumed.stdout
    final = load_checkpoint(run_dir / "checkpoint.pt")
    assert final["step"] == STEPS
    for key in uninterrupted["student"]:
        assert torch.equal(uninterrupted["student"][key], final["student"][key]), key


def test_a_default_run_killed_after_the_interval_resumes_to_the_uninterrupted_weights(uninterrupted, tmp_path):
    """SIGKILL (nothing can be saved then) after a time-based checkpoint; the clock is shortened
    through the config, nothing else is set: no checkpoint_every."""
    runs = tmp_path / "runs"
    args = _untracked_run(runs, STEPS, "--set", "train.checkpoint_minutes=0.01")  # every 0.6 s
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(runs.glob("runs/*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = runs.glob("runs/*")
    killed_at = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert 0 < killed_at < STEPS
    resumed = subprocess.run([*args, "--resume", "auto"], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {killed_at}" in resumed.stdout
    final = load_checkpoint(run_dir / "checkpoint.pt")
    for key in uninterrupted["student"]:
        assert torch.equal(uninterrupted["student"][key], final["student"][key]), key


def test_a_full_mlflow_store_during_training_is_one_line_and_the_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    """SQLite's SQLITE_FULL, raised where MLflow writes metrics (as sqlalchemy raises it, from
    sqlite3.OperationalError), after the first checkpoint: one line, exit 1, the checkpoint named."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    written = []

    def log_batch(self, run_id, metrics=(), **kwargs):
        if any(m.key == "train/loss" and m.step > 20 for m in metrics):
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as cause:
                raise RuntimeError("(sqlite3.OperationalError) database or disk is full [SQL: INSERT ...]") from cause
        written.append(run_id)
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "40", "--batch-size", "16",
                 "--checkpoint-every", "10", "--runs-dir", str(tmp_path), "--set", "train.log_every=5", *SMALL])
    errors = _errors(capsys)
    assert code == 1 and written and len(errors) == 1, errors
    store = tmp_path / "mlflow.db"
    assert f"no space left on the device writing {store} (the MLflow store is full" in errors[0], errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"the last checkpoint, {run_dir / 'checkpoint.pt'}, is kept" in errors[0]
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 20


def test_a_store_too_full_to_be_created_is_one_line_before_any_training(tmp_path, capsys):
    """A real tmpfs too small for MLflow's new SQLite store (root only; skipped elsewhere)."""
    with _small_tmpfs(tmp_path / "small", "150k") as mount:
        code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "5", "--batch-size", "16",
                     "--runs-dir", str(mount / "runs"), *SMALL])
        errors = _errors(capsys)
        assert code == 1 and len(errors) == 1, errors
        assert errors[0] == (f"distillkit: error: cannot start an MLflow run: no space left on the device for the store "
                             f"{mount / 'runs' / 'mlflow.db'}; nothing was trained; free some space and run again")
        assert not (mount / "runs" / "runs").exists() or not list((mount / "runs" / "runs").rglob("*.pt"))


def _agree(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from distillkit.training.distributed import Distributed, StepAgreement

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Only rank 0's clock is due, only rank 1 got the signal: both must act on both, at the
        # same step: the next exchange (the step after) under torchrun.
        agreement = StepAgreement(Distributed(world, rank), torch.device("cpu"), 2)
        answers = [agreement.exchange([rank == 0, rank == 1]), agreement.exchange([False, False]),
                   agreement.exchange([False, rank == 1]), agreement.exchange([False, False])]
        agreement.close()
        queue.put((rank, answers + [agreement._pending is None]))
    finally:
        dist.destroy_process_group()


def test_checkpoint_and_stop_decisions_are_the_same_on_every_rank():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_agree, args=(rank, 2, port, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    expected = [[False, False], [True, True], [False, False], [False, True], True]
    assert results == {0: expected, 1: expected}


def test_in_one_process_the_decisions_are_acted_on_at_once_and_the_clock_asks_once_per_interval(monkeypatch):
    from distillkit.training import interruption
    from distillkit.training.distributed import Distributed, StepAgreement

    agreement = StepAgreement(Distributed(), torch.device("cpu"), 2)
    assert agreement.exchange([True, False]) == [True, False] and agreement.exchange([False, True]) == [False, True]
    now = [0.0]
    monkeypatch.setattr(interruption.time, "monotonic", lambda: now[0])
    clock = interruption.CheckpointClock(1.0)
    now[0] = 59.0
    assert not clock.due()
    now[0] = 61.0
    assert clock.due() and not clock.due()  # once: the checkpoint it asked for may come a step later
    clock.reset()
    now[0] = 120.0
    assert not clock.due()
    now[0] = 121.5
    assert clock.due()


# ------------------------------------------------------------------------------------------------
# checkpoints that cannot be resumed or loaded


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("good")
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "4", "--batch-size", "16",
                 "--no-track", "--runs-dir", str(runs), *SMALL]) == 0
    return next(runs.glob("runs/*/checkpoint.pt"))


def _damaged(good: Path, kind: str, target: Path) -> Path:
    payload = load_checkpoint(good)
    if kind == "format-only":
        payload = {"format": payload["format"]}
    elif kind == "no-optimizer":
        payload = {k: v for k, v in payload.items() if k not in ("optimizer", "optimizers")}
    elif kind == "wrong-shapes":
        weights = {k: torch.zeros(3, *v.shape[1:]) if v.dim() else v for k, v in payload["student"].items()}
        payload.update(student=weights, ema=weights, emas={k: weights for k in payload["emas"]})
    elif kind == "far-future-step":
        payload["step"] = 10**9
    target.mkdir(parents=True, exist_ok=True)
    torch.save(payload, target / "checkpoint.pt")
    return target / "checkpoint.pt"


@pytest.mark.parametrize("kind,expected", [("format-only", "has no 'config'"), ("no-optimizer", "has no 'optimizer'"),
                                           ("wrong-shapes", "does not fit the network"),
                                           ("far-future-step", "at least the step of the checkpoint resumed, 1000000000")])
def test_run_resume_of_a_checkpoint_it_cannot_continue_is_a_one_line_error_that_writes_nothing(
        kind, expected, good_checkpoint, tmp_path, capsys):
    path = _damaged(good_checkpoint, kind, tmp_path / "ckpt")
    code = main(["run", "--resume", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no finished.json, samples.png
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind,expected", [("format-only", "has no 'config'"),
                                           ("wrong-shapes", "weights do not fit the network")])
@pytest.mark.parametrize("command", ["sample", "eval", "teacher"])
def test_loading_a_truncated_or_foreign_checkpoint_is_a_one_line_error(kind, expected, command, good_checkpoint,
                                                                        tmp_path, capsys):
    path = _damaged(good_checkpoint, kind, tmp_path / "ckpt")
    argv = {"sample": ["sample", "--run", str(path), "--out", str(tmp_path / "s.png")],
            "eval": ["eval", "--run", str(path), "--no-log", "--nfe", "1", "--set", "sample.num_samples=16"],
            "teacher": ["run", "--method", "cd", "--teacher", str(path), "--dataset", "toy2d", "--max-steps", "2",
                        "--no-track", "--runs-dir", str(tmp_path / "runs"), "--quiet"]}[command]
    code = main(argv)
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors


# ------------------------------------------------------------------------------------------------
# a full disk


def test_a_full_disk_is_a_one_line_failure_that_keeps_the_earlier_checkpoint(tmp_path, capsys, monkeypatch):
    real_save = torch.save
    calls = []

    def save_until_the_disk_is_full(payload, stream, *args, **kwargs):
        if isinstance(payload, dict) and payload.get("format") == "distillkit-checkpoint":
            calls.append(payload["step"])
            if payload["step"] > 2:
                stream.write(b"\0" * 100)  # part of the file fits, then the device is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(stream, "name", None))
        return real_save(payload, stream, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
                 "--checkpoint-every", "2", "--runs-dir", str(tmp_path), *SMALL])
    errors = _errors(capsys)
    assert code == 1 and len(errors) == 1 and "no space left on the device" in errors[0], errors
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"the last checkpoint, {run_dir / 'checkpoint.pt'}, is kept" in errors[0]
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2
    assert not list(run_dir.rglob("*.tmp"))
    assert _status(tmp_path, run_dir.name) == "FAILED"


# ------------------------------------------------------------------------------------------------
# a run killed during its first checkpoint write


_KILLED_DURING_THE_FIRST_WRITE = """
import os, sys, torch
def save(payload, stream, *args, **kwargs):
    stream.write(b"part of a checkpoint"); stream.flush(); os.kill(os.getpid(), 9)
torch.save = save
from distillkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_auto_fails_the_run_killed_during_its_first_checkpoint_and_removes_its_temporary_file(tmp_path):
    from mlflow.tracking import MlflowClient

    args = ["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "6", "--batch-size", "16",
            "--checkpoint-every", "3", "--runs-dir", str(tmp_path), *SMALL, "--resume", "auto"]
    killed = subprocess.run([sys.executable, "-c", _KILLED_DURING_THE_FIRST_WRITE, *args], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (orphan,) = (tmp_path / "runs").iterdir()
    assert list(orphan.rglob("*.tmp")) and not (orphan / "checkpoint.pt").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(orphan.name).info.status == "RUNNING"

    resumed = subprocess.run([str(BIN / "distillkit"), *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    new = next(p for p in (tmp_path / "runs").iterdir() if p != orphan)
    old_run = client.get_run(orphan.name)
    assert old_run.info.status == "FAILED"
    assert f"started run {new.name} in its place" in old_run.data.tags["distillkit.superseded_by"]
    assert "killed before its first checkpoint" in old_run.data.tags["distillkit.superseded_by"]
    assert not list(orphan.rglob("*.tmp"))
    assert client.get_run(new.name).info.status == "FINISHED"


def test_resume_auto_leaves_a_live_run_of_the_same_config_alone(tmp_path):
    """A run folder without a checkpoint whose process still runs is not an orphan."""
    from distillkit.training.orphans import find_orphans, write_marker

    live, dead = tmp_path / "runs" / "live", tmp_path / "runs" / "dead"
    write_marker(live, "abc", None, "")
    write_marker(dead, "abc", None, "")
    record = json.loads((dead / "run.json").read_text())
    record["pid"] = 2**22 + 12345  # above Linux's pid_max: no such process
    (dead / "run.json").write_text(json.dumps(record))
    assert find_orphans(tmp_path, "abc") == [dead]
    assert find_orphans(tmp_path, "other") == []


def test_a_real_full_tmpfs_is_the_same_one_line_failure(tmp_path, capsys):
    """A small tmpfs (root only; skipped elsewhere): the first checkpoint fits, the second does not.
    torch's zip writer reports the full disk as a RuntimeError; save_atomic restores the OSError."""
    with _small_tmpfs(tmp_path / "small", "4500k") as mount:
        code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "40", "--batch-size", "16",
                     "--checkpoint-every", "10", "--runs-dir", str(mount / "runs"), *SMALL])
        errors = _errors(capsys)
        assert code == 1 and len(errors) == 1 and "no space left on the device" in errors[0], errors
        (run_dir,) = (mount / "runs" / "runs").iterdir()
        assert "is kept" in errors[0]
        assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 10
        assert not list(run_dir.rglob("*.tmp"))


@contextlib.contextmanager
def _small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``mount`` (root only: the test is skipped elsewhere)."""
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)  # detached even if a file there is still open


def test_the_resume_command_of_a_torchrun_run_is_a_torchrun_launch(tmp_path):
    from distillkit.training.interruption import resume_command

    ckpt = tmp_path / "a b" / "checkpoint.pt"
    assert resume_command(ckpt, True, {}) == f"distillkit run --resume '{ckpt}'"
    assert resume_command(ckpt, False, {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) == (
        f"torchrun --standalone --nproc-per-node=4 -m distillkit.cli.main run --resume '{ckpt}' --no-track")
    several = resume_command(ckpt, True, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    assert several.startswith("torchrun with the run's own launch options (2 machines x 8 processes) -m distillkit.cli.main")
