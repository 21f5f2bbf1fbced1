"""The plugin guide's two method examples, installed as separate packages and used by name.

- ``distillkit-stepflow``: a method with an extra conditioning input (the step size d) and its
  own sampler;
- ``distillkit-toydmd``: a two-network method with two optimizers (generator + fake score), a
  one-step sampler and a metric. It trains, resumes bitwise after a SIGKILL, and is evaluated by
  name.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillkit.training.checkpoint import load_checkpoint
from example_packages import pip_install_examples

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
BIN = Path(sys.executable).parent
DMD_ARGS = ["run", "--method", "toy-dmd", "--teacher", "toy2d-exact", "--dataset", "toy2d",
            "--set", "dataset_options.train_size=448", "--batch-size", "64", "--max-steps", "300",
            "--checkpoint-every", "10", "--set", "sample.num_samples=200", "--nfe", "1",
            "--set", "method_options.fake_updates=2", "--set", "train.networks.fake_score.lr=0.003"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """pip-install both examples into a private directory (not into the test environment)."""
    target = pip_install_examples(["distillkit-stepflow", "distillkit-toydmd"], tmp_path_factory)
    return dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")


def run(env, *argv, timeout=300):
    return subprocess.run([str(BIN / "distillkit"), *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_plugins_list_the_method_sampler_and_metric_with_their_provider(env):
    result = run(env, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    providers = {kind: {e["name"]: e["provider"] for e in listing[kind]} for kind in ("methods", "samplers", "metrics")}
    assert providers["methods"]["toy-dmd"] == "toydmd" and providers["methods"]["stepflow"] == "stepflow"
    assert providers["samplers"]["onestep"] == "toydmd" and providers["samplers"]["stepflow"] == "stepflow"
    assert providers["metrics"]["missed_modes"] == "toydmd"
    plugins = {p["name"]: p for p in listing["plugins"]}
    assert plugins["toydmd"]["distribution"] == "distillkit-toydmd" and plugins["toydmd"]["errors"] == []


def test_stepflow_trains_and_samples_with_its_own_sampler_by_default(env, tmp_path):
    result = run(env, "run", "--method", "stepflow", "--dataset", "toy2d", "--set", "dataset_options.train_size=448",
                 "--batch-size", "64", "--max-steps", "30", "--nfe", "1,2,4", "--set", "sample.num_samples=100",
                 "--runs-dir", str(tmp_path), "--no-track")
    assert result.returncode == 0, result.stderr
    assert "stepflow/uniform" in result.stdout
    refused = run(env, "run", "--method", "stepflow", "--dataset", "toy2d", "--sampler", "consistency", "--dry-run")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "a sampler method stepflow can use:" in refused.stderr and "stepflow" in refused.stderr.split("use:")[1]
    odd = run(env, "run", "--method", "stepflow", "--dataset", "toy2d", "--nfe", "3", "--dry-run")
    assert odd.returncode == 2 and "power of two" in odd.stderr


def test_two_network_method_resumes_bitwise_after_a_kill_and_is_evaluated_by_name(env, tmp_path):
    whole = run(env, *DMD_ARGS, "--runs-dir", str(tmp_path / "whole"), "--no-track", "--quiet")
    assert whole.returncode == 0, whole.stderr
    victim = subprocess.Popen([str(BIN / "distillkit"), *DMD_ARGS, "--runs-dir", str(tmp_path / "killed")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed").glob("runs/*/checkpoints/step-00000030.pt")):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (run_dir,) = (tmp_path / "killed" / "runs").iterdir()
    killed_at = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert 30 <= killed_at < 300, "the run should have been killed part-way"
    resumed = run(env, "run", "--resume", "auto", *DMD_ARGS[1:], "--runs-dir", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {killed_at}" in resumed.stdout
    a = load_checkpoint(next((tmp_path / "whole").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(run_dir / "checkpoint.pt")
    for key in ("student", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for k in a["networks"]["fake_score"]:
        assert torch.equal(a["networks"]["fake_score"][k], b["networks"]["fake_score"][k]), k
    assert set(a["optimizers"]) == {"generator", "fake_score"}
    for name in a["optimizers"]:
        for index, state in a["optimizers"][name]["state"].items():
            for field, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizers"][name]["state"][index][field]))
    # the two optimizers are what the method and the user asked for
    assert a["optimizers"]["fake_score"]["param_groups"][0]["lr"] == pytest.approx(0.003)
    assert a["optimizers"]["fake_score"]["param_groups"][0]["weight_decay"] == pytest.approx(1e-4)
    assert a["optimizers"]["generator"]["param_groups"][0]["weight_decay"] == 0

    evaluated = run(env, "eval", "--run", run_dir.name, "--runs-dir", str(tmp_path / "killed"), "--nfe", "1",
                    "--metric", "missed_modes,energy", "--sampler", "onestep", "--n", "200", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)["metrics"]
    assert 0.0 <= metrics["eval/missed_modes/nfe1"] <= 1.0
    assert metrics["eval/energy/nfe1"] >= 0.0
    wrong = run(env, "eval", "--run", run_dir.name, "--runs-dir", str(tmp_path / "killed"), "--nfe", "2", "--no-log")
    assert wrong.returncode == 2 and "exactly 1 network evaluation" in wrong.stderr


def test_example_plugins_pass_the_conformance_bases(env):
    tests = [str(EXAMPLES / "distillkit-stepflow" / "test_stepflow.py"), str(EXAMPLES / "distillkit-toydmd" / "test_toydmd.py")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


def test_guide_shows_the_examples_verbatim():
    guide = (ROOT / "docs" / "plugin-guide.md").read_text()
    for folder, names in (("distillkit-stepflow", ("distillkit_stepflow.py", "test_stepflow.py")),
                          ("distillkit-toydmd", ("distillkit_toydmd.py", "test_toydmd.py"))):
        for name in names:
            assert (EXAMPLES / folder / name).read_text().strip() in guide, name
