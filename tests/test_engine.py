"""The training engine: exact resume, atomic checkpoints, retention, EMAs, DDP with gloo."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit.config import run_config_from_dict
from distillkit.errors import ConfigError
from distillkit.resolve import resolve
from distillkit.tracking import NullTracker
from distillkit.training.checkpoint import load_checkpoint, save_atomic
from distillkit.training.ema import ema_decay_at, halflife_decay_at, make_ema
from distillkit.training.state import prune
from distillkit.training.trainer import train

from crashing import Crash, crash_at

BIN = Path(sys.executable).parent

# toy2d with 448 training points and batches of 64: 7 steps per epoch, so 16 steps cross two
# epoch boundaries; dropout makes the global RNG matter; the loss draws t and noise every step.
TREE = {
    "method": "fm", "dataset": "toy2d", "seed": 3,
    "dataset_options": {"train_size": 448},
    "backbone_options": {"dropout": 0.1},
    "train": {"max_steps": 16, "batch_size": 64, "checkpoint_every": 8, "warmup_steps": 4, "ema_decay": [0.9, 0.99]},
    "sample": {"nfe": [1], "num_samples": 16, "reference_steps": 1},
}


def resolved(tree=TREE):
    return resolve(run_config_from_dict(tree), distillkit.get_registries())


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_continues_bitwise_identically_across_epochs(tmp_path):
    whole = train(resolved(), NullTracker(), tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        train(resolved(), NullTracker(), tmp_path / "parts", progress=False, on_step=crash_at(9))
    payload = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert payload["step"] == 8
    resumed = train(resolved(), NullTracker(), tmp_path / "parts", resume=payload, progress=False)
    assert resumed.resumed_from_step == 8
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_state(a["student"], b["student"])
    for name in ("ema_0.9", "ema_0.99"):
        assert_same_state(a["emas"][name], b["emas"][name])
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert a["data"][0]["epoch"] == b["data"][0]["epoch"] == 2


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                                 reason="torch.compile on a CPU needs a C compiler (cc or gcc)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_a_compiled_run_with_graph_capture_trains_and_resumes_bitwise(device, tmp_path, monkeypatch):
    """``train.compile_mode=reduce-overhead`` reaches torch.compile (CUDA graphs on a GPU; on a CPU
    it compiles without them), and a crashed compiled run resumes to the uninterrupted one's state."""
    modes = []
    real_compile = torch.compile

    def spy(model, **kw):
        modes.append(kw.get("mode"))
        return real_compile(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    from torch._dynamo.utils import counters

    declined = counters["inductor"]["cudagraph_skips"]
    tree = {**TREE, "device": device, "train": {**TREE["train"], "compile": True, "compile_mode": "reduce-overhead"}}
    whole = train(resolved(tree), NullTracker(), tmp_path / "whole", progress=False)
    assert modes == ["reduce-overhead"] and torch.isfinite(torch.tensor(whole.final_loss))
    if device == "cuda":  # inductor falls back to kernels without graphs, with a warning, where it cannot capture
        assert counters["inductor"]["cudagraph_skips"] == declined, "CUDA graph capture was declined (see the log)"
    with pytest.raises(Crash):
        train(resolved(tree), NullTracker(), tmp_path / "parts", progress=False, on_step=crash_at(9))
    payload = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    resumed = train(resolved(tree), NullTracker(), tmp_path / "parts", resume=payload, progress=False)
    assert resumed.resumed_from_step == 8 and modes == ["reduce-overhead"] * 3
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same_state(a["student"], b["student"])
    for name in ("ema_0.9", "ema_0.99"):
        assert_same_state(a["emas"][name], b["emas"][name])
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


def test_a_compile_mode_without_compile_is_a_one_line_error():
    with pytest.raises(ConfigError, match="train.compile_mode='reduce-overhead' is not allowed: .*needs train.compile=true"):
        run_config_from_dict({"train": {"compile_mode": "reduce-overhead"}})
    with pytest.raises(ConfigError, match="one of default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"):
        run_config_from_dict({"train": {"compile": True, "compile_mode": "graphs"}})


def test_resume_reattaches_to_the_mlflow_run_without_relogging_params(tmp_path):
    from mlflow.tracking import MlflowClient

    from distillkit.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "engine", tmp_path / "artifacts")
    with pytest.raises(Crash):
        train(resolved(), tracker, tmp_path / "run", progress=False, on_step=crash_at(9))
    tracker.finish("FAILED")
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["run_id"] == tracker.run_id
    again = MlflowTracker(uri, "engine", tmp_path / "artifacts", run_id=payload["run_id"])
    train(resolved(), again, tmp_path / "run", resume=payload, progress=False)
    again.finish()
    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "16"
    steps = [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    args = ["run", "--method", "fm", "--dataset", "toy2d", "--set", "dataset_options.train_size=448",
            "--batch-size", "64", "--max-steps", "400", "--checkpoint-every", "20", "--no-track", "--quiet",
            "--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--nfe", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run([str(BIN / "distillkit"), *args, "--runs-dir", str(tmp_path / "whole")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    victim = subprocess.Popen([str(BIN / "distillkit"), *args, "--runs-dir", str(tmp_path / "killed")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed").glob("runs/*/checkpoints/step-00000040.pt")):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (run_dir,) = (tmp_path / "killed" / "runs").iterdir()
    killed_at = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert 40 <= killed_at < 400, "the run should have been killed part-way"
    resumed = subprocess.run([str(BIN / "distillkit"), "run", "--resume", run_dir.name, "--runs-dir",
                              str(tmp_path / "killed"), "--no-track", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {killed_at}" in resumed.stdout
    a = load_checkpoint(next((tmp_path / "whole").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(run_dir / "checkpoint.pt")
    assert_same_state(a["student"], b["student"])
    assert_same_state(a["ema"], b["ema"])


def test_resume_refuses_changes_to_what_is_trained(tmp_path, capsys):
    from distillkit.cli.main import main

    with pytest.raises(Crash):
        train(resolved(), NullTracker(), tmp_path / "runs" / "r1", progress=False, on_step=crash_at(9))
    code = main(["run", "--resume", "r1", "--runs-dir", str(tmp_path), "--set", "train.lr=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume='train.lr' is not allowed: only where and how long" in err


def test_resume_auto_picks_the_unfinished_run_of_the_same_config(tmp_path, capsys):
    from distillkit.cli.main import main
    from distillkit.cli.run import config_identity

    runs = tmp_path / "runs"
    with pytest.raises(Crash):
        train(resolved(), NullTracker(), runs / "runs" / "first", progress=False, on_step=crash_at(9))
    flags = ["run", "--method", "fm", "--dataset", "toy2d", "--seed", "3",
             "--set", "dataset_options.train_size=448", "--set", "backbone_options.dropout=0.1",
             "--max-steps", "16", "--batch-size", "64", "--checkpoint-every", "8", "--set", "train.warmup_steps=4",
             "--set", "train.ema_decay=[0.9, 0.99]", "--nfe", "1", "--set", "sample.num_samples=16",
             "--set", "sample.reference_steps=1", "--runs-dir", str(runs), "--no-track", "--quiet", "--resume", "auto"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "resumed at step 8" in out and "/first/" in out
    assert config_identity(resolved().to_dict()) == config_identity(
        resolved({**TREE, "runs_dir": "elsewhere", "train": {**TREE["train"], "checkpoint_every": 4}}).to_dict())


def test_checkpoint_write_is_atomic_when_the_process_dies_mid_write(tmp_path, monkeypatch):
    path = save_atomic({"format": "distillkit-checkpoint", "value": torch.ones(3)}, tmp_path / "c.pt")

    def dying_save(obj, stream, *args, **kwargs):
        stream.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is interrupted in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"format": "distillkit-checkpoint", "value": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_retention_keeps_the_newest_and_every_mth(tmp_path):
    for step in range(10, 110, 10):
        (tmp_path / f"step-{step:08d}.pt").write_bytes(b"x")
    prune(tmp_path, keep_last=2, keep_every=50)
    assert sorted(int(p.stem[5:]) for p in tmp_path.iterdir()) == [50, 90, 100]


def test_ema_schedules_match_their_closed_forms():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10_000) == 0.999
    # EDM: beta = 0.5 ** (batch / halflife), the half-life ramped to at most ratio x images seen.
    assert halflife_decay_at(500_000, 0.05, 512, 10**6) == pytest.approx(0.5 ** (512 / 500_000))
    assert halflife_decay_at(500_000, 0.05, 512, 99) == pytest.approx(0.5 ** (512 / (100 * 512 * 0.05)))


def test_ema_update_is_the_closed_form_with_integer_buffers_copied_and_resumes():
    # A network with a float parameter, a float buffer and an integer buffer (BatchNorm's counter).
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = make_ema(student, lambda n: 0.5 + 0.1 * (n % 3))
    expected = {k: v.clone() for k, v in student.state_dict().items()}
    for update in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student[1].running_mean.add_(1.0)
            student[1].num_batches_tracked.add_(1)
        ema.update_parameters(student)
        current = student.state_dict()
        for key, value in current.items():
            if update == 0 or not value.is_floating_point():
                expected[key] = value.clone()  # the first update copies; integers follow the student
            else:
                decay = 0.5 + 0.1 * (update % 3)
                expected[key] = decay * expected[key] + (1 - decay) * value
    for key, value in ema.module.state_dict().items():
        assert torch.allclose(value.float(), expected[key].float(), atol=1e-6), key
    assert int(ema.n_averaged) == 5
    # A reloaded average continues with the same update count (same decay schedule).
    restored = make_ema(student, lambda n: 0.5 + 0.1 * (n % 3))
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 5 and set(restored.state_dict()) == set(ema.state_dict())


def test_named_emas_and_images_seen_in_the_checkpoint(tmp_path):
    tree = {**TREE, "train": {**TREE["train"], "ema_decay": [0.5], "ema_halflife_images": 1000.0, "checkpoint_every": 0}}
    tracker = NullTracker()
    result = train(resolved(tree), tracker, tmp_path, progress=False)
    assert tracker.metrics["cost/network_evals_once"] == [(0, 0.0)]  # this method generates no data
    payload = load_checkpoint(result.checkpoint)
    assert list(payload["emas"]) == ["ema_0.5", "ema_hl1000"] and payload["default_ema"] == "ema_0.5"
    assert payload["images_seen"] == 16 * 64


@pytest.mark.parametrize("check", ["auto", "device"])  # train.nonfinite_check: auto is the host check on a CPU
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(check, tmp_path):
    common = ["run", "--method", "fm", "--dataset", "toy2d",
              "--set", "dataset_options.train_size=448", "--batch-size", "64", "--max-steps", "10",
              "--no-track", "--quiet", "--nfe", "1", "--set", "sample.num_samples=16",
              "--set", "sample.reference_steps=1", "--device", "cpu", "--set", f"train.nonfinite_check={check}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([str(BIN / "distillkit"), *common, "--set", "train.grad_accumulation=2",
                             "--runs-dir", str(tmp_path / "single")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "distillkit.cli.main",
                          *common, "--runs-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 processes" in ddp.stderr
    a = load_checkpoint(next((tmp_path / "single").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(next((tmp_path / "ddp").glob("runs/*/checkpoint.pt")))
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=1e-4, atol=1e-5)


def test_time_checkpoints_under_torchrun_come_once_per_interval_and_change_no_weight(tmp_path):
    """The checkpoint clock's decision is agreed on one step late under torchrun (StepAgreement):
    each interval gives one checkpoint (never a second one at the step after) and the weights equal
    those of the same DDP run without time checkpoints."""
    common = ["run", "--method", "fm", "--dataset", "toy2d", "--set", "dataset_options.train_size=448",
              "--batch-size", "64", "--max-steps", "300", "--no-track", "--quiet", "--nfe", "1",
              "--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def ddp(name: str, *extra: str):
        done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "distillkit.cli.main",
                               *common, "--runs-dir", str(tmp_path / name), *extra], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return next((tmp_path / name).glob("runs/*"))

    timed = ddp("timed", "--set", "train.checkpoint_minutes=0.004", "--set", "train.keep_last=1000")  # every 0.24 s
    steps = sorted(int(p.stem.split("-")[1]) for p in (timed / "checkpoints").glob("step-*.pt"))
    assert len(steps) >= 4 and steps[-1] == 300, steps
    by_time = steps[:-1]  # the last one is the end of the run's, which may follow a time checkpoint at once
    assert min(b - a for a, b in zip(by_time, by_time[1:])) > 1, steps
    plain = ddp("plain")
    a, b = load_checkpoint(plain / "checkpoint.pt"), load_checkpoint(timed / "checkpoint.pt")
    for key, value in a["student"].items():
        assert torch.equal(b["student"][key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_agreement_on_cuda_reads_the_collective_a_step_later_through_pinned_memory():
    """StepAgreement's CUDA path (pinned copy and event behind an NCCL all-reduce), in a process
    group of one rank that the agreement treats as distributed."""
    import socket

    import torch.distributed as dist

    from distillkit.training.distributed import Distributed, StepAgreement

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        agreement = StepAgreement(Distributed(world_size=2, rank=0), torch.device("cuda"), 2)
        x = torch.randn(2048, 2048, device="cuda")
        answers = []
        for flags in ([True, False], [False, False], [False, True], [False, False]):
            answers.append(agreement.exchange(flags))
            assert agreement._pending[1].host.is_pinned()  # read through pinned memory, not a blocking copy
            x = x @ x / 2048  # device work queued behind each exchange
        assert answers == [[False, False], [True, False], [False, False], [False, True]]
    finally:
        dist.destroy_process_group()


def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_the_resume_is_exact(tmp_path):
    """The stop is agreed one step late (StepAgreement): both ranks checkpoint the same step, and
    resuming it under torchrun ends with the weights of the uninterrupted DDP run."""
    import signal
    import time

    common = ["run", "--method", "fm", "--dataset", "toy2d", "--set", "dataset_options.train_size=448",
              "--batch-size", "64", "--max-steps", "800", "--no-track", "--quiet", "--nfe", "1",
              "--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "distillkit.cli.main"]
    whole = subprocess.run([*torchrun, *common, "--runs-dir", str(tmp_path / "whole")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    runs = tmp_path / "cut"
    proc = subprocess.Popen([*torchrun, *common, "--runs-dir", str(runs), "--checkpoint-every", "100"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(runs.glob("runs/*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it was signalled"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.startswith("distillkit: interrupted by SIGTERM")]
    assert len(lines) == 1, err[-3000:]  # rank 0 speaks for both
    (run_dir,) = runs.glob("runs/*")
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert 100 <= saved["step"] < 800 and f"(step {saved['step']})" in lines[0] and len(saved["rng"]) == 2
    import shlex

    command = shlex.split(lines[0].split("resume with: ")[1])  # the printed command, run as printed
    assert command[:5] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "distillkit.cli.main"], command
    resumed = subprocess.run([str(BIN / "torchrun"), *command[1:], "--quiet"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(next((tmp_path / "whole").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(run_dir / "checkpoint.pt")
    assert b["step"] == 800
    for key, value in a["student"].items():
        assert torch.equal(b["student"][key], value), key
