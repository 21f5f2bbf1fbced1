"""``train.nonfinite_check=device``: the NaN/inf check decided on the device (a found-inf flag that
fused Adam obeys) and read back one step late. A stop comes one step later and keeps the last
good checkpoint; a skipped step leaves everything as if its update had not been applied; resume
stays bitwise. On a CPU nothing runs ahead of the host, but the code path is the one a GPU runs;
``DISTILLKIT_TEST_DEVICE=cuda`` runs the single-network tests on a GPU (pinned copies, events)."""

import math
import os

import attrs
import pytest
import torch

import distillkit
from distillkit import LossOutput, Method, hookimpl, plugin_manager
from distillkit.config import run_config_from_dict
from distillkit.errors import ConfigError, TrainingFailed
from distillkit.resolve import resolve
from distillkit.tracking import NullTracker
from distillkit.training.checkpoint import load_checkpoint
from distillkit.training.trainer import train

from crashing import Crash, assert_same, crash_at
from test_multi_network import GeneratorAndCritic, TwoNetworkPlugin
from test_multi_network import tree as two_network_tree

DEVICE = os.environ.get("DISTILLKIT_TEST_DEVICE", "cpu")


@attrs.frozen
class FaultOptions:
    at: int = -1  # the 0-based step whose loss (or gradient) is NaN; -1: none
    kind: str = "loss"  # loss: a NaN loss; gradient: a finite loss with a NaN gradient


class NaNAt(Method):
    """Flow matching with a NaN loss or gradient at one chosen step."""

    name = "nan-at"
    config_class = FaultOptions

    def loss(self, student, batch, generator, step):
        x0 = batch.x
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        t = torch.rand(x0.shape[0], generator=generator, device=x0.device)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = torch.nn.functional.mse_loss(student(x_t, t), eps - x0)
        if step == self.config.at and self.config.kind == "loss":
            return LossOutput(loss * float("nan"))
        if step == self.config.at:  # sqrt'(0) is inf and 0 x inf is NaN: value + 0, gradient NaN
            return LossOutput(loss + torch.sqrt(sum(p.sum() for p in student.parameters()) * 0.0))
        return LossOutput(loss)


class PlainGeneratorAndCritic(GeneratorAndCritic):
    """The two-network toy without its after_step, which nonfinite=skip on the device refuses."""

    name = "toy-generator-critic-plain"
    after_step = Method.after_step


class Plugin:
    @staticmethod
    @hookimpl
    def distillkit_register_methods(register):
        register(NaNAt)
        register(PlainGeneratorAndCritic)


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    monkeypatch.setattr(plugin_manager, "_STATE",
                        plugin_manager.load_plugins([("faults", Plugin), ("two-networks", TwoNetworkPlugin)]))


def resolved(at=-1, kind="loss", device=DEVICE, **train_options):
    # toy2d with 448 points and batches of 64: 7 steps per epoch; dropout makes the global RNG matter.
    tree = {
        "method": "nan-at", "dataset": "toy2d", "seed": 3, "method_options": {"at": at, "kind": kind}, "device": device,
        "dataset_options": {"train_size": 448}, "backbone_options": {"dropout": 0.1},
        "train": {"max_steps": 16, "batch_size": 64, "warmup_steps": 4, "ema_decay": [0.9, 0.99],
                  "nonfinite_check": "device", **train_options},
        "sample": {"nfe": [1], "num_samples": 16, "reference_steps": 1},
    }
    return resolve(run_config_from_dict(tree), distillkit.get_registries())


@pytest.mark.parametrize("nonfinite, at", [("stop", -1), ("skip", 4)])
def test_resume_is_bitwise_with_the_device_check(nonfinite, at, tmp_path):
    options = dict(at=at, nonfinite=nonfinite, checkpoint_every=8)
    tracker = NullTracker()
    whole = train(resolved(**options), tracker, tmp_path / "whole", progress=False)
    with pytest.raises(Crash):
        train(resolved(**options), NullTracker(), tmp_path / "parts", progress=False, on_step=crash_at(9))
    payload = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    assert payload["step"] == 8
    resumed = train(resolved(**options), NullTracker(), tmp_path / "parts", resume=payload, progress=False)
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    assert_same(a, b, "checkpoint")
    assert a["skipped_at"] == ([5] if at >= 0 else [])
    assert a["optimizer"]["param_groups"][0]["fused"] is True  # the implementation that obeys the flag
    assert tracker.tags["distillkit.nonfinite_check"] == "device"


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_nan_under_stop_stops_one_step_later_and_keeps_the_last_good_checkpoint(kind, tmp_path):
    seen = []
    with pytest.raises(TrainingFailed, match=rf"non-finite {kind} at step 3 .*the last good checkpoint is (.*)") as error:
        train(resolved(at=2, kind=kind, checkpoint_every=2, max_steps=10), NullTracker(), tmp_path, progress=False,
              on_step=seen.append)
    # Step 3's flag is read during step 4, which is not completed; step 3 was not checkpointed.
    assert seen == [1, 2, 3]
    assert str(tmp_path / "checkpoint.pt") in str(error.value)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["step"] == 2
    good = train(resolved(max_steps=2), NullTracker(), tmp_path / "good", progress=False)
    assert_same(checkpoint["student"], load_checkpoint(good.checkpoint)["student"], "student")


def test_a_nan_at_a_checkpoint_step_stops_before_the_checkpoint_is_written(tmp_path):
    with pytest.raises(TrainingFailed, match=r"non-finite loss at step 4 "):
        train(resolved(at=3, checkpoint_every=2, max_steps=10), NullTracker(), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_a_skipped_step_leaves_weights_moments_emas_and_schedule_as_if_it_never_ran(tmp_path):
    skipped = load_checkpoint(train(resolved(at=3, nonfinite="skip", max_steps=4), NullTracker(), tmp_path / "a",
                                    progress=False).checkpoint)
    reference = load_checkpoint(train(resolved(nonfinite="skip", max_steps=3), NullTracker(), tmp_path / "b",
                                      progress=False).checkpoint)
    assert skipped["step"] == 4 and skipped["skipped_at"] == [4] and reference["skipped_at"] == []
    for key in ("student", "emas", "ema_state", "optimizer", "scheduler", "scaler"):
        assert_same(skipped[key], reference[key], key)
    assert all(torch.isfinite(w).all() for w in skipped["student"].values())


def test_a_skipped_update_of_a_two_update_step_leaves_only_that_network_alone(tmp_path):
    def run(steps, nan_at):
        tree = two_network_tree(nonfinite="skip", nonfinite_check="device", max_steps=steps,
                                method_options={"plan": "both", "nan_critic_at": nan_at})
        tree["method"] = PlainGeneratorAndCritic.name
        return train(resolve(run_config_from_dict(tree), distillkit.get_registries()), NullTracker(),
                     tmp_path / f"{steps}-{nan_at}", progress=False)

    skipped, reference = load_checkpoint(run(3, 2).checkpoint), load_checkpoint(run(2, -1).checkpoint)
    assert skipped["skipped_at"] == [3]
    assert_same(skipped["networks"], reference["networks"], "critic")
    assert_same(skipped["optimizers"]["critic"], reference["optimizers"]["critic"], "critic optimizer")
    assert skipped["optimizers"]["student"]["state"][0]["step"] == 3  # the generator update of step 3 ran
    # The step counts as applied (as with the host check): every EMA and schedule followed it.
    assert int(skipped["network_ema_state"]["critic"]["ema_0.9"]["n_averaged"]) == 3
    assert skipped["schedulers"]["critic"]["last_epoch"] == 3


def test_a_two_network_stop_names_the_update_one_step_later(tmp_path):
    tree = two_network_tree(nonfinite_check="device", method_options={"nan_critic_at": 3})
    with pytest.raises(TrainingFailed, match=r"non-finite loss in update 0 \(critic\) at step 4"):
        train(resolve(run_config_from_dict(tree), distillkit.get_registries()), NullTracker(), tmp_path,
              progress=False)


@pytest.mark.parametrize("options, expected", [
    ({"optimizer": "radam"}, "radam (network student) has no fused implementation"),
    ({"precision": "fp16"}, "under fp16 the loss scaler"),
])
def test_a_device_check_the_run_cannot_do_is_a_one_line_config_error(options, expected, tmp_path):
    with pytest.raises(ConfigError, match=r"train.nonfinite_check='device' is not allowed: host or auto") as error:
        train(resolved(max_steps=1, **options), NullTracker(), tmp_path, progress=False)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_skip_on_the_device_is_refused_for_a_method_that_changes_state_after_each_step(tmp_path):
    tree = two_network_tree(nonfinite="skip", nonfinite_check="device")
    with pytest.raises(ConfigError, match="method toy-generator-critic changes its own state after each step"):
        train(resolve(run_config_from_dict(tree), distillkit.get_registries()), NullTracker(), tmp_path,
              progress=False)


def test_auto_is_the_host_check_on_a_cpu_and_a_host_checkpoint_resumes_with_the_device_check(tmp_path):
    tracker = NullTracker()
    host = train(resolved(max_steps=4, nonfinite_check="auto", device="cpu"), tracker, tmp_path / "host", progress=False)
    assert tracker.tags["distillkit.nonfinite_check"] == "host"
    payload = load_checkpoint(host.checkpoint)
    assert not payload["optimizer"]["param_groups"][0]["fused"]
    # The option may change on resume (it says how a run runs): the optimizer becomes the fused one.
    resumed = train(resolved(max_steps=6, device="cpu"), NullTracker(), tmp_path / "host", resume=payload,
                    progress=False)
    after = load_checkpoint(resumed.checkpoint)
    assert after["step"] == 6 and after["optimizer"]["param_groups"][0]["fused"] is True
    assert after["optimizer"]["state"][0]["step"] == 6


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 22])
def test_the_cpu_weights_check_equals_the_max_norm_of_every_tensor(chunk_elements):
    from distillkit.training.step import largest_magnitude_on_cpu

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator) * 3 for shape in ((4, 3), (5,), (2, 2, 2), (1,))]
    tensors.append(torch.randn(6, generator=generator).to(torch.bfloat16))  # mixed dtypes are promoted
    expected = torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)
    assert largest_magnitude_on_cpu(tensors, chunk_elements).item() == pytest.approx(expected.item(), rel=0, abs=0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = [t.clone() for t in tensors]
        spoiled[2].view(-1)[5] = bad
        assert not math.isfinite(largest_magnitude_on_cpu(spoiled, chunk_elements).item())
