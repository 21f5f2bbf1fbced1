"""Every registered method against distillkit's method contract (distillkit.testing.methods).

The methods that distil a teacher run twice: with the analytic ``toy2d-exact`` teacher (no
network, so the student starts from its own weights) and with a tiny trained checkpoint whose
network has the student's shapes (so the student starts from the teacher's weights). Every method
also runs on class-conditional 8x8 digits with a small U-Net, so labels and image tensors are
exercised; and a toy two-network method (tests/test_multi_network.py) runs on both.
"""

import pytest
import torch

import distillkit
from distillkit.cli.main import main
from distillkit.testing.methods import MethodConformance

REGISTRIES = distillkit.get_registries()
METHODS = sorted(REGISTRIES.methods.names())
TEACHER_METHODS = [name for name in METHODS if REGISTRIES.methods.get(name).requires_teacher]
TINY_MLP = {"hidden": 16, "layers": 1, "time_embedding_dim": 8}

# Options that keep the methods which generate data from their teacher fast.
FAST = {
    "rf-reflow": {"num_pairs": 64, "pair_nfe": 8},
    "rf-distill": {"num_pairs": 64, "pair_nfe": 8, "k": 2},
    "cud-stage2": {"num_trajectories": 64, "generation_batch": 64},
}
# The analytic teacher has no weights to start a student from.
NO_WEIGHTS = {"cud-stage2": {"init_from_teacher": False}}



@pytest.fixture(params=METHODS)
def method_name(request):
    return request.param


class TestEveryRegisteredMethod(MethodConformance):
    def options(self, name):
        return {**FAST.get(name, {}), **NO_WEIGHTS.get(name, {})}


@pytest.fixture(scope="module")
def tiny_fm_checkpoint(tmp_path_factory):
    runs = tmp_path_factory.mktemp("teacher")
    argv = ["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "2", "--batch-size", "16",
            "--no-track", "--quiet", "--runs-dir", str(runs), "--nfe", "1", "--set", "sample.num_samples=16",
            "--set", "sample.reference_steps=1", "--set", "dataset_options.train_size=64"]
    argv += [f"--set=backbone_options.{k}={v}" for k, v in TINY_MLP.items()]
    assert main(argv) == 0
    return next(runs.glob("runs/*/checkpoint.pt"))


class TestTeacherMethodsWithACheckpointTeacher(MethodConformance):
    @pytest.fixture(params=TEACHER_METHODS)
    def method_name(self, request):
        return request.param

    @pytest.fixture(autouse=True)
    def _checkpoint_teacher(self, tiny_fm_checkpoint):
        self.teacher = str(tiny_fm_checkpoint)

    def options(self, name):
        return FAST.get(name, {})


class LabelledTeacher(distillkit.Teacher):
    """A stand-in teacher for class-conditional images that insists on getting labels."""

    name = "labelled-test-teacher"
    identity = "labelled-test-teacher"

    def velocity(self, x, t, cond=None):
        assert cond is not None and cond.shape == (x.shape[0],), "the teacher was asked without labels"
        scale = 1.0 + cond.to(x.dtype).view(-1, 1, 1, 1) / 10
        return scale * x * t.view(-1, 1, 1, 1) - 0.5 * x


class TestClassConditionalImages(MethodConformance):
    """Labels must reach the student, the teacher and generated pairs; image tensors are 4-D."""

    dataset = "digits"
    dataset_options = {"class_conditional": True}
    backbone = "unet"
    backbone_options = {"channels": 8, "channel_mult": [1], "num_groups": 4, "time_embedding_dim": 16}
    batch_size = 8

    @pytest.fixture(params=METHODS)
    def method_name(self, request):
        return request.param

    def make_teacher(self, dataset):
        return LabelledTeacher()

    def options(self, name):
        return {**FAST.get(name, {}), **NO_WEIGHTS.get(name, {})}


# -- multi-network methods, and the base's own checks -------------------------------------------

from test_multi_network import GeneratorAndCritic  # noqa: E402  (a toy generator + critic method)

from distillkit import LossOutput, Method  # noqa: E402
from distillkit.testing.methods import check_loss_ignores_global_rng  # noqa: E402


class TestTwoNetworkMethod(MethodConformance):
    """Two networks, two optimizers, an update plan (critic, critic, generator)."""

    method_class = GeneratorAndCritic


class TestTwoNetworkMethodOnLabelledImages(MethodConformance):
    method_class = GeneratorAndCritic
    dataset = "digits"
    dataset_options = {"class_conditional": True}
    backbone = "unet"
    backbone_options = {"channels": 8, "channel_mult": [1], "num_groups": 4, "time_embedding_dim": 16}
    batch_size = 8


class GlobalRandomness(Method):
    """Flow matching whose noise comes from the global RNG, not from the generator it is given."""

    name = "global-randomness"

    def loss(self, student, batch, generator, step):
        eps = torch.randn(batch.x.shape)  # the bug the base must catch
        t = torch.rand(batch.x.shape[0], generator=generator)
        x_t = (1 - t[:, None]) * batch.x + t[:, None] * eps
        return LossOutput(torch.nn.functional.mse_loss(student(x_t, t), eps - batch.x))


class _GlobalRandomnessConformance(MethodConformance):
    method_class = GlobalRandomness


def test_the_base_fails_a_loss_that_draws_from_the_global_rng(tmp_path):
    setup = _GlobalRandomnessConformance().build(GlobalRandomness.name, tmp_path)
    with pytest.raises(AssertionError, match="'loss' loss at step 0 changes with the global torch seed"):
        check_loss_ignores_global_rng(setup)
    # the same loss drawing from its generator passes
    fixed = _GlobalRandomnessConformance().build("fm", tmp_path)
    check_loss_ignores_global_rng(fixed)
