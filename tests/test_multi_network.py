"""Training programs with several networks: a toy generator + critic method on toy2d.

The critic is updated in steps 0, 1 (mod 3), the generator in step 2 (mod 3), each by its own
optimizer (Adam for the generator, AdamW with other betas and a smaller lr for the critic). The
critic regresses the flow-matching velocity of the generator's one-step samples; the generator's
loss is flow matching on real data plus a term read through the (frozen) critic, so gradients
flow through a network that must not change.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import torch

import distillkit
from distillkit import LossOutput, Method, Update, hookimpl, plugin_manager
from distillkit.config import run_config_from_dict
from distillkit.errors import ConfigError, TrainingFailed
from distillkit.resolve import resolve
from distillkit.tracking import NullTracker
from distillkit.training.checkpoint import load_checkpoint
from distillkit.training.trainer import train

from crashing import Crash, assert_same, crash_at

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
TINY_MLP = {"hidden": 16, "layers": 1, "time_embedding_dim": 8}


@attrs.frozen
class ToyOptions:
    plan: str = "alternate"  # alternate: critic, critic, generator; both: critic then generator each step
    nan_critic_at: int = -1  # 0-based step whose critic loss is NaN
    critic_lr_ratio: float = 0.5


class GeneratorAndCritic(Method):
    name = "toy-generator-critic"
    config_class = ToyOptions

    def build_networks(self, make_backbone):
        self.networks = {"student": make_backbone(), "critic": make_backbone()}
        return self.networks

    def optimizer_config(self, network, default):
        if network == "critic":
            return attrs.evolve(default, optimizer="adamw", lr=default.lr * self.config.critic_lr_ratio,
                                betas=(0.5, 0.9), weight_decay=0.01)
        return default

    def ema_networks(self):
        return ("student", "critic")

    def update_plan(self, step):
        critic, generator = Update("critic", ("critic",)), Update("generator", ("student",))
        if self.config.plan == "both":
            return (critic, generator)
        return (critic,) if step % 3 < 2 else (generator,)

    def update_loss(self, networks, update, batch, generator, step):
        student, critic = networks["student"], networks["critic"]
        x0, cond = batch.x, batch.cond
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.rand(x0.shape[0], generator=generator)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - tb) * x0 + tb * eps
        if update.loss == "critic":
            with torch.no_grad():
                fake = x_t - tb * student(x_t, t, cond)  # the generator's one-step estimate of x0
            loss = torch.nn.functional.mse_loss(critic((1 - tb) * fake + tb * eps, t, cond), eps - fake)
            if step == self.config.nan_critic_at:
                loss = loss * float("nan")
            return LossOutput(loss, {"fake_norm": fake.flatten(1).norm(dim=1).mean().detach()})
        velocity = student(x_t, t, cond)
        fake = x_t - tb * velocity
        through_critic = critic((1 - tb) * fake + tb * eps, t, cond).pow(2).mean()
        loss = torch.nn.functional.mse_loss(velocity, eps - x0) + 0.01 * through_critic
        return LossOutput(loss, {"critic_term": float(through_critic.detach())})

    def prepare(self, student, context):
        assert student is self.networks["student"], "prepare gets the sampling network"
        self.snapshots = [self._snapshot()]
        type(self).last_prepared = self  # the tests read the snapshots back

    def after_step(self, student, step):
        assert student is self.networks["student"]
        self.snapshots.append(self._snapshot())
        for name, network in self.networks.items():
            assert all(p.requires_grad for p in network.parameters()), f"{name} left frozen after the step"

    def _snapshot(self):
        return {name: {k: v.detach().clone() for k, v in net.state_dict().items()} for name, net in self.networks.items()}


class TwoNetworkPlugin:
    @staticmethod
    @hookimpl
    def distillkit_register_methods(register):
        register(GeneratorAndCritic)


@pytest.fixture
def two_networks(monkeypatch):
    monkeypatch.setattr(plugin_manager, "_STATE", plugin_manager.load_plugins([("two-networks", TwoNetworkPlugin)]))


def tree(**train_options):
    method_options = train_options.pop("method_options", {})
    return {
        "method": GeneratorAndCritic.name, "dataset": "toy2d", "seed": 5,
        "dataset_options": {"train_size": 192}, "backbone_options": {**TINY_MLP, "dropout": 0.1},
        "method_options": method_options,
        "train": {"max_steps": 9, "batch_size": 32, "warmup_steps": 2, "ema_decay": [0.9], "log_every": 1,
                  **train_options},
        "sample": {"nfe": [1], "num_samples": 16, "reference_steps": 1},
    }


def resolved(t):
    return resolve(run_config_from_dict(t), distillkit.get_registries())


def test_each_update_changes_only_its_own_network_and_logs_per_update(two_networks, tmp_path):
    tracker = NullTracker()
    result = train(resolved(tree()), tracker, tmp_path, progress=False)
    snapshots = GeneratorAndCritic.last_prepared.snapshots
    assert len(snapshots) == 10
    for step in range(9):
        before, after = snapshots[step], snapshots[step + 1]
        updated = "critic" if step % 3 < 2 else "student"
        frozen = "student" if updated == "critic" else "critic"
        assert_same(after[frozen], before[frozen], f"{frozen} in step {step}")
        assert any(not torch.equal(after[updated][k], before[updated][k]) for k in before[updated]), \
            f"{updated} did not change in step {step}"
    # Per-update keys (each averaged over the steps it ran in) and a learning rate per network.
    assert [s for s, _ in tracker.metrics["train/critic/loss"]] == [1, 2, 4, 5, 7, 8]
    assert [s for s, _ in tracker.metrics["train/generator/loss"]] == [3, 6, 9]
    assert {"train/critic/grad_norm", "train/critic/fake_norm", "train/generator/loss", "train/generator/grad_norm",
            "train/generator/critic_term", "train/lr/student", "train/lr/critic"} <= set(tracker.metrics)
    assert "train/loss" not in tracker.metrics
    lr = dict(tracker.metrics["train/lr/critic"])
    assert lr[1] == pytest.approx(2e-3 * 0.5 * 1.0) and dict(tracker.metrics["train/lr/student"])[1] == pytest.approx(2e-3)
    assert tracker.tags["distillkit.networks"] == "student,critic"
    payload = load_checkpoint(result.checkpoint)
    assert payload["version"] == 2 and set(payload["optimizers"]) == {"student", "critic"}
    group = payload["optimizers"]["critic"]["param_groups"][0]
    assert group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.01 and group["lr"] == pytest.approx(1e-3)
    assert_same(payload["optimizer"], payload["optimizers"]["student"])
    assert set(payload["networks"]) == {"critic"} and set(payload["network_emas"]["critic"]) == {"ema_0.9"}
    # The sampling network's weights are where load_trained_model reads them.
    model = distillkit.load_trained_model(result.checkpoint, weights="online").model
    assert_same(model.state_dict(), payload["student"])


def test_resume_is_bitwise_for_both_networks_their_optimizers_and_emas(two_networks, tmp_path):
    t = tree(checkpoint_every=4)
    whole = train(resolved(t), NullTracker(), tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        train(resolved(t), NullTracker(), tmp_path / "parts", progress=False, on_step=crash_at(6))
    payload = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert payload["step"] == 4
    resumed = train(resolved(t), NullTracker(), tmp_path / "parts", resume=payload, progress=False)
    assert resumed.resumed_from_step == 4
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    for key in ("student", "emas", "networks", "network_emas", "network_ema_state", "optimizers", "schedulers",
                "scaler", "skipped_steps"):
        assert_same(a[key], b[key], key)
    assert a["optimizers"]["critic"]["state"][0]["step"] == 6  # updated in steps 0, 1, 3, 4, 6, 7


def test_nonfinite_stop_names_the_update_and_skip_skips_only_that_update(two_networks, tmp_path):
    with pytest.raises(TrainingFailed, match=r"non-finite loss in update 0 \(critic\) at step 4"):
        train(resolved(tree(method_options={"nan_critic_at": 3})), NullTracker(), tmp_path / "stop", progress=False)

    # Two updates per step: the NaN critic update (not the step's last) is skipped, the generator
    # update of the same step still runs.
    tracker = NullTracker()
    train(resolved(tree(nonfinite="skip", max_steps=4, method_options={"plan": "both", "nan_critic_at": 2})),
          tracker, tmp_path / "skip", progress=False)
    snapshots = GeneratorAndCritic.last_prepared.snapshots
    assert_same(snapshots[3]["critic"], snapshots[2]["critic"], "the skipped critic update")
    assert any(not torch.equal(snapshots[3]["student"][k], snapshots[2]["student"][k]) for k in snapshots[2]["student"])
    assert dict(tracker.metrics["train/skipped_steps"])[3] == 1
    assert [s for s, _ in tracker.metrics["train/critic/loss"]] == [1, 2, 4]  # step 3's critic logged nothing


def test_per_network_overrides_from_the_user_and_unknown_networks(two_networks, tmp_path):
    t = tree(max_steps=2, networks={"critic": {"optimizer": "radam", "lr": 1e-4, "lr_schedule": "constant"}})
    payload = load_checkpoint(train(resolved(t), NullTracker(), tmp_path / "a", progress=False).checkpoint)
    group = payload["optimizers"]["critic"]["param_groups"][0]
    # the user's optimizer, lr and schedule on top of the method's betas and weight decay
    assert group["lr"] == 1e-4 and group["betas"] == (0.5, 0.9) and group["weight_decay"] == 0.01
    assert payload["schedulers"]["critic"]["_last_lr"] == [1e-4]  # constant: no warm-up
    with pytest.raises(ConfigError, match=r"train\.networks\.fake_score=.*networks of method toy-generator-critic: student, critic"):
        train(resolved(tree(networks={"fake_score": {"lr": 1e-4}})), NullTracker(), tmp_path / "b", progress=False)


SCRIPT = """
import sys
sys.path.insert(0, {here!r})
from distillkit import plugin_manager
from test_multi_network import TwoNetworkPlugin
plugin_manager._STATE = plugin_manager.load_plugins([("two-networks", TwoNetworkPlugin)])
from distillkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(tmp_path: Path) -> list[str]:
    script = tmp_path / "cli_with_toy.py"
    script.write_text(SCRIPT.format(here=str(HERE)))
    return [sys.executable, str(script)]


RUN = ["run", "--method", GeneratorAndCritic.name, "--dataset", "toy2d", "--set", "dataset_options.train_size=192",
       "--batch-size", "32", "--no-track", "--quiet", "--nfe", "1", "--set", "sample.num_samples=16",
       "--set", "sample.reference_steps=1", "--set", "backbone_options.dropout=0.1",
       *(f"--set=backbone_options.{k}={v}" for k, v in TINY_MLP.items())]


def test_sigkill_then_resume_auto_ends_with_the_uninterrupted_weights(tmp_path):
    cli = _cli(tmp_path)
    args = [*RUN, "--max-steps", "200", "--checkpoint-every", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    whole = subprocess.run([*cli, *args, "--runs-dir", str(tmp_path / "whole")], env=env, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = tmp_path / "killed"
    victim = subprocess.Popen([*cli, *args, "--runs-dir", str(killed), "--resume", "auto"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(killed.glob("runs/*/checkpoints/step-00000050.pt")):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (run_dir,) = (killed / "runs").iterdir()
    killed_at = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert 50 <= killed_at < 200, "the run should have been killed part-way"
    resumed = subprocess.run([*cli, *args, "--runs-dir", str(killed), "--resume", "auto"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {killed_at}" in resumed.stdout
    a = load_checkpoint(next((tmp_path / "whole").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(run_dir / "checkpoint.pt")
    for key in ("student", "ema", "networks", "network_emas", "optimizers"):
        assert_same(a[key], b[key], key)


def test_two_gloo_processes_match_one_process_with_two_networks(tmp_path):
    cli = _cli(tmp_path)
    # no dropout: each rank draws its masks from its own global RNG, one process from one
    args = [*RUN, "--max-steps", "6", "--batch-size", "64", "--device", "cpu", "--set", "backbone_options.dropout=0.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([*cli, *args, "--set", "train.grad_accumulation=2", "--runs-dir", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", str(tmp_path / "cli_with_toy.py"),
                          *args, "--runs-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_checkpoint(next((tmp_path / "one").glob("runs/*/checkpoint.pt")))
    b = load_checkpoint(next((tmp_path / "ddp").glob("runs/*/checkpoint.pt")))
    assert b["world_size"] == 2
    for weights_a, weights_b in ((a["student"], b["student"]), (a["networks"]["critic"], b["networks"]["critic"])):
        for key, value in weights_a.items():
            torch.testing.assert_close(weights_b[key], value, rtol=1e-4, atol=1e-5)
