"""The ``dmd2`` plugin (plugins/distillkit_dmd2) against closed forms written here.

- The generator's loss gradient along its samples, against the distribution-matching gradient
  computed in this file: the exact ``toy2d-exact`` mixture as the real score, the exact score of a
  Gaussian generator as the fake score (tests/one_step_toys.py has the Gaussian algebra).
- The update plan (five fake-score updates per generator update), through the trainer too; each
  loss changes only its own network; the evaluation count per step against counted calls.
- The Method conformance base on toy2d, and on labelled digit images with the GAN head and a
  two-step generator; bitwise resume of both networks, their optimizers and EMAs.
- A toy2d demonstration: one-step energy distance against an untrained generator.
"""

from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import Batch, DataSpec, MethodContext, Update
from distillkit.errors import ConfigError
from distillkit.testing.methods import MethodConformance
from distillkit.training.checkpoint import load_checkpoint

from one_step_toys import (CallCounter, Counted, GaussianGenerator, GaussianScore, RecordingTeacher,
                           assert_resume_is_bitwise, demonstration, gaussian_x0, mixture_x0, run, toy2d_tree)

REGISTRIES = distillkit.get_registries()
DMD2 = REGISTRIES.methods.get("dmd2")
TOY = REGISTRIES.datasets.get("toy2d").config_class()  # the default mixture: 8 modes, radius 2, std 0.15


def karras_t(index, count=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's sigma_index (index 0 the smallest) as distillkit's time sigma / (1 + sigma)."""
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigma = (low + index / (count - 1) * (high - low)) ** rho
    return sigma / (1 + sigma)


def make_method(teacher, **options):
    context = MethodContext(data=DataSpec((2,)), integrator=REGISTRIES.integrators.get("euler"),
                            integrator_name="euler", total_steps=10, teacher=teacher)
    return DMD2(DMD2.config_class(**options), context)


def generator_step(method, generator_net, fake_net, n=512, seed=0):
    networks = {"generator": generator_net, "fake_score": fake_net}
    output = method.update_loss(networks, Update("generator", ("generator",)), Batch(torch.zeros(n, 2)),
                                torch.Generator().manual_seed(seed), 0)
    output.loss.backward()
    x_in, tau, out = generator_net.records[-1]
    sample = (x_in - tau[:, None] * out).detach()
    return sample, -out.grad / tau[:, None], output  # dL/dx_g = -dL/dout / tau


# -- the distribution-matching gradient ------------------------------------------------------

def test_generator_gradient_is_the_normalised_score_difference_with_the_exact_toy2d_teacher():
    means = torch.stack([torch.tensor([2 * torch.cos(torch.tensor(2 * torch.pi * k / 8)),
                                       2 * torch.sin(torch.tensor(2 * torch.pi * k / 8))]) for k in range(8)])
    teacher = RecordingTeacher(wrapped=REGISTRIES.teachers.get("toy2d-exact")(TOY))
    mu_g, s_g = torch.tensor([0.3, -0.2]), 0.8
    generator_net, fake = GaussianGenerator(mu_g, s_g), GaussianScore(mu_g, s_g)
    sample, grad_x, _ = generator_step(make_method(teacher), generator_net, fake)
    (x_t, t), n = teacher.calls[-1], sample.shape[0]
    # the noise levels are EDM's Karras indices 20..980 of 1000
    assert t.min() >= karras_t(20) - 1e-6 and t.max() <= karras_t(980) + 1e-6 and t.std() > 0.1
    x0_real = mixture_x0(x_t, t, means, TOY.std)
    x0_fake = gaussian_x0(x_t, t, mu_g, s_g)
    scale = (sample - x0_real).abs().mean(1, keepdim=True)
    expected = (x0_fake - x0_real) / scale / sample.numel()  # d/dx_g of 1/2 mean |x_g - sg(x_g - g)|^2
    torch.testing.assert_close(grad_x, expected, rtol=2e-3, atol=1e-7)
    # through the generator's parameters: x_g = mu_g + s_g eps
    eps = (sample - mu_g) / s_g
    torch.testing.assert_close(generator_net.mu.grad, expected.sum(0), rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(generator_net.s.grad, (expected * eps).sum(), rtol=2e-3, atol=1e-7)


def test_pinned_noise_level_and_a_gaussian_teacher():
    # dm_min_step = dm_max_step pins sigma: t = sigma_500 / (1 + sigma_500), ~ 0.73.
    mu, s = torch.tensor([1.0, -0.5]), 0.5
    mu_g = torch.tensor([-1.0, 1.0])
    teacher = RecordingTeacher(mu, s)
    method = make_method(teacher, dm_min_step=500, dm_max_step=500)
    generator_net = GaussianGenerator(mu_g, s)
    sample, grad_x, _ = generator_step(method, generator_net, GaussianScore(mu_g, s), n=256)
    x_t, t = teacher.calls[-1]
    torch.testing.assert_close(t, torch.full_like(t, karras_t(500)))
    # Equal widths: x0_fake - x0_real = (mu_g - mu)(1 - c (1 - t)) exactly, whatever x_t.
    t0 = karras_t(500)
    c = (1 - t0) * s**2 / ((1 - t0) ** 2 * s**2 + t0**2)
    x0_real = gaussian_x0(x_t, t, mu, s)
    expected = (mu_g - mu) * (1 - c * (1 - t0)) / (sample - x0_real).abs().mean(1, keepdim=True) / sample.numel()
    torch.testing.assert_close(grad_x, expected, rtol=1e-4, atol=1e-8)
    # gradient descent moves the generator's mean toward the data's
    assert torch.dot(generator_net.mu.grad, mu_g - mu) > 0


def test_no_gradient_when_the_generator_already_matches_the_teacher():
    mu, s = torch.tensor([0.5, 0.25]), 0.7
    generator_net = GaussianGenerator(mu, s)
    _, grad_x, output = generator_step(make_method(RecordingTeacher(mu, s)), generator_net, GaussianScore(mu, s))
    assert grad_x.abs().max() < 1e-7 and float(output.loss.detach()) < 1e-10


# -- the update plan, each loss on its own network, costs -------------------------------------

@pytest.mark.parametrize("ratio", [5, 3])
def test_update_plan_two_time_scales(ratio):
    method = make_method(None, fake_updates_per_generator=ratio)
    plans = [method.update_plan(step) for step in range(4 * ratio)]
    for step, plan in enumerate(plans):
        fake = Update("fake_score", ("fake_score",))
        expected = (fake, Update("generator", ("generator",))) if step % ratio == ratio - 1 else (fake,)
        assert plan == expected, f"step {step}"
    fake_updates = sum(u.loss == "fake_score" for plan in plans for u in plan)
    generator_updates = sum(u.loss == "generator" for plan in plans for u in plan)
    assert fake_updates == ratio * generator_updates


def test_the_trainer_follows_the_plan_and_a_fake_score_step_leaves_the_generator(tmp_path):
    five = load_checkpoint(run(toy2d_tree("dmd2", 5), tmp_path / "five").checkpoint)
    six = load_checkpoint(run(toy2d_tree("dmd2", 6), tmp_path / "six").checkpoint)
    # step 5 (0-based) is a fake-score update only: the generator (the sampled "student") is unchanged
    assert all(torch.equal(five["student"][k], six["student"][k]) for k in five["student"])
    assert any(not torch.equal(five["networks"]["fake_score"][k], six["networks"]["fake_score"][k])
               for k in five["networks"]["fake_score"])
    assert six["optimizers"]["generator"]["state"][0]["step"] == 1  # after step 4's fake-score update
    assert six["optimizers"]["fake_score"]["state"][0]["step"] == 6


class CountingTeacher(distillkit.Teacher):
    name = "counting-test-teacher"
    identity = "counting-test-teacher"

    def __init__(self, wrapped, counter):
        self.wrapped, self.counter = wrapped, counter

    def velocity(self, x, t, cond=None):
        return self.counter.count(self.wrapped.velocity(x, t, cond))


@pytest.mark.parametrize("options, per_cycle", [
    # 5 x (generator no grad + fake score) + (generator + teacher + fake score no grad)
    ({}, {"with_grad": 6, "no_grad": 7}),
    # two-step generator (one chain step more, no grad) and GAN (real-data classifier pass in each
    # fake-score update, a fake-score pass with input gradient in the generator update)
    ({"generator_steps": 2, "gan_generator_weight": 3e-3, "gan_discriminator_weight": 1e-2},
     {"with_grad": 5 * 2 + 2, "no_grad": 5 * 2 + 3}),
])
def test_evaluations_per_step_are_the_counted_calls_of_a_cycle(options, per_cycle):
    counter = CallCounter()
    teacher = CountingTeacher(REGISTRIES.teachers.get("toy2d-exact")(TOY), counter)
    method = make_method(teacher, **options)
    mlp = REGISTRIES.backbones.get("mlp")
    config = mlp.config_class(hidden=16, layers=1, time_embedding_dim=8)
    networks = method.build_networks(lambda conditioning=(): mlp.build(config, DataSpec((2,))))
    counted = {name: Counted(network, counter) for name, network in networks.items()}
    batch = Batch(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))
    for step in range(5):
        for update in method.update_plan(step):
            for name, network in networks.items():
                network.requires_grad_(name in update.networks)
            method.update_loss(counted, update, batch, torch.Generator().manual_seed(step), step).loss.backward()
    assert counter.counts == per_cycle
    steps, cycle = method.evals_per_cycle()
    assert (steps, cycle) == (5, per_cycle)
    assert method.network_evals_per_step() == {k: -(-v // 5) for k, v in per_cycle.items()}  # rounded up


# -- starting from the teacher -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_fm_checkpoint(tmp_path_factory):
    from distillkit.cli.main import main

    runs = tmp_path_factory.mktemp("fm-teacher")
    argv = ["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "2", "--batch-size", "16", "--no-track",
            "--quiet", "--runs-dir", str(runs), "--nfe", "1", "--set", "sample.num_samples=16",
            "--set", "sample.reference_steps=1", "--set", "dataset_options.train_size=64",
            "--set", "backbone_options.hidden=16", "--set", "backbone_options.layers=1",
            "--set", "backbone_options.time_embedding_dim=8"]
    assert main(argv) == 0
    return next(runs.glob("runs/*/checkpoint.pt"))


@pytest.mark.parametrize("method_name", ["dmd2", "sid"])
def test_both_networks_start_from_the_teachers_weights_and_another_architecture_is_refused(
        method_name, tiny_fm_checkpoint, tmp_path):
    from distillkit import PrepareContext, TeacherContext
    from distillkit.teachers import load_teacher

    toy = REGISTRIES.datasets.get("toy2d")(TOY)
    teacher = load_teacher(str(tiny_fm_checkpoint), REGISTRIES,
                           TeacherContext(data=toy.spec, dataset_name="toy2d", dataset_config=TOY))
    source = distillkit.teacher_network(teacher).state_dict()
    mlp = REGISTRIES.backbones.get("mlp")
    cls = REGISTRIES.methods.get(method_name)
    for hidden, fits in ((16, True), (32, False)):
        method = cls(cls.config_class(), MethodContext(data=toy.spec, integrator=None, integrator_name="euler",
                                                       total_steps=1, teacher=teacher))
        config = mlp.config_class(hidden=hidden, layers=1, time_embedding_dim=8)
        networks = method.build_networks(lambda conditioning=(): mlp.build(config, toy.spec))
        context = PrepareContext(device="cpu", dataset=toy, output_dir=tmp_path, log_artifact=lambda *a: None)
        if not fits:
            with pytest.raises(ConfigError, match="init_from_teacher"):
                method.prepare(networks["generator"], context)
            continue
        method.prepare(networks["generator"], context)
        fake = networks["fake_score"]
        fake = getattr(fake, "backbone", fake)
        for network in (networks["generator"], fake):
            assert all(torch.equal(network.state_dict()[k], v) for k, v in source.items())
        assert method.tags()[f"distillkit.{method_name}.init"] == "teacher"


# -- the conformance base, resume, demonstration ---------------------------------------------

class TestDMD2(MethodConformance):
    method_name = "dmd2"


class TestDMD2WithGANAndTwoStepsOnLabelledImages(MethodConformance):
    method_name = "dmd2"
    dataset = "digits"
    dataset_options = {"class_conditional": True}
    backbone = "unet"
    backbone_options = {"channels": 8, "channel_mult": [1], "num_groups": 4, "time_embedding_dim": 16}
    batch_size = 8

    def make_teacher(self, dataset):
        from test_method_conformance import LabelledTeacher

        return LabelledTeacher()

    def options(self, name):
        return {"gan_generator_weight": 3e-3, "gan_discriminator_weight": 1e-2, "generator_steps": 2}


def test_resume_is_bitwise_for_both_networks(tmp_path):
    payload = assert_resume_is_bitwise("dmd2", tmp_path, method_options={"gan_generator_weight": 3e-3,
                                                                         "gan_discriminator_weight": 1e-2})
    assert payload["optimizers"]["generator"]["state"][0]["step"] == 2  # steps 4 and 9
    assert payload["optimizers"]["fake_score"]["state"][0]["step"] == 12


def test_toy2d_demonstration_beats_an_untrained_generator(tmp_path):
    # 300 steps (60 generator updates) with the exact toy2d teacher; measured: 0.31 -> 0.08.
    before, after, _ = demonstration("dmd2", 300, tmp_path)
    assert after < 0.4 * before, (before, after)


# -- recipes ---------------------------------------------------------------------------------

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("dmd2-*.toml")) + \
    sorted((Path(__file__).resolve().parents[1] / "recipes").glob("sid-*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_resolve_with_their_method_options(path, capsys):
    import tomllib

    from distillkit.cli.main import main

    written = tomllib.loads(path.read_text())
    assert main(["run", "--config", str(path), "--dry-run", "--teacher", "toy2d-exact"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["method"] == written["method"] and printed["sample"]["sampler"] == "consistency"
    for key, value in written["method_options"].items():
        assert printed["method_options"][key] == pytest.approx(value), key
    for key, value in written["train"].items():
        assert printed["train"][key] == (pytest.approx(value) if not isinstance(value, list) else value), key


def test_recipes_cover_the_papers_datasets():
    assert {p.stem for p in RECIPES} == {"dmd2-cifar10", "dmd2-mnist", "dmd2-imagenet64", "sid-cifar10", "sid-mnist"}


def test_a_gan_on_a_backbone_without_features_is_refused():
    class Plain(torch.nn.Module):  # a backbone without the output_heads capability
        name = "plain"

        def forward(self, x, t, cond=None):
            return x

    method = make_method(None, gan_generator_weight=3e-3)
    with pytest.raises(ConfigError, match="gan_generator_weight.*output_heads"):
        method.build_networks(lambda conditioning=(): Plain())
    assert set(make_method(None).build_networks(lambda conditioning=(): Plain())) == {"generator", "fake_score"}
