"""The ``sid`` plugin (plugins/distillkit_sid) against closed forms written here.

- The generator's loss gradient along its samples: for a Gaussian teacher, a Gaussian generator
  and the generator's exact score as the fake score, the SiD gradient (through both scores'
  inputs) is derived by hand below; with the exact ``toy2d-exact`` mixture teacher it is
  differentiated from this file's own mixture posterior mean.
- The update plan (one fake-score update, then one generator update, every step), through the
  trainer; the evaluation count per step against counted calls.
- The Method conformance base on toy2d and on labelled digit images; bitwise resume; a toy2d
  demonstration against an untrained generator.
"""

import pytest
import torch

import distillkit
from distillkit import Batch, DataSpec, MethodContext, Update
from distillkit.testing.methods import MethodConformance
from distillkit.training.checkpoint import load_checkpoint

from one_step_toys import (CallCounter, Counted, GaussianGenerator, GaussianScore, RecordingTeacher,
                           assert_resume_is_bitwise, demonstration, gaussian_slope, gaussian_x0, mixture_x0, run,
                           toy2d_tree)
from test_dmd2 import CountingTeacher

REGISTRIES = distillkit.get_registries()
SID = REGISTRIES.methods.get("sid")
TOY = REGISTRIES.datasets.get("toy2d").config_class()


def make_method(teacher, **options):
    context = MethodContext(data=DataSpec((2,)), integrator=REGISTRIES.integrators.get("euler"),
                            integrator_name="euler", total_steps=10, teacher=teacher)
    return SID(SID.config_class(**options), context)


def generator_step(method, generator_net, fake_net, n=512, seed=0):
    networks = {"generator": generator_net, "fake_score": fake_net}
    output = method.update_loss(networks, Update("generator", ("generator",)), Batch(torch.zeros(n, 2)),
                                torch.Generator().manual_seed(seed), 0)
    output.loss.backward()
    x_in, tau, out = generator_net.records[-1]
    sample = (x_in - tau[:, None] * out).detach()
    return sample, -out.grad / tau[:, None], output


def sid_t(u, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    sigma = (sigma_min ** (1 / rho) + u * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
    return sigma / (1 + sigma)


@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
def test_generator_gradient_matches_the_hand_derived_sid_gradient_for_gaussians(alpha):
    mu, s = torch.tensor([1.0, -0.5]), 0.5
    mu_g, s_g = torch.tensor([-0.4, 0.7]), 0.9
    teacher = RecordingTeacher(mu, s)
    generator_net = GaussianGenerator(mu_g, s_g)
    sample, grad_x, _ = generator_step(make_method(teacher, alpha=alpha), generator_net, GaussianScore(mu_g, s_g))
    x_t, t = teacher.calls[-1]
    # noise levels: EDM's rho-ramp over the first 80% of the way from sigma_min to sigma_max
    assert t.min() >= sid_t(0.0) - 1e-6 and t.max() <= sid_t(0.8) + 1e-6 and t.max() > 0.9
    # l = delta ((D_r - x_g) - alpha delta) / w, per element; dx_t/dx_g = 1 - t, dD/dx_t = c
    tc = t.reshape(-1, 1)
    d_real, d_fake = gaussian_x0(x_t, t, mu, s), gaussian_x0(x_t, t, mu_g, s_g)
    delta = d_real - d_fake
    a = (gaussian_slope(t, s) - gaussian_slope(t, s_g)) * (1 - tc)  # d delta / d x_g
    b = gaussian_slope(t, s) * (1 - tc) - 1                          # d (D_r - x_g) / d x_g
    w = (sample - d_real).abs().mean(1, keepdim=True).clamp_min(1e-5)
    expected = (a * ((d_real - sample) - alpha * delta) + delta * (b - alpha * a)) / w / sample.numel()
    torch.testing.assert_close(grad_x, expected, rtol=1e-3, atol=1e-8)
    eps = (sample - mu_g) / s_g
    torch.testing.assert_close(generator_net.mu.grad, expected.sum(0), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(generator_net.s.grad, (expected * eps).sum(), rtol=1e-3, atol=1e-7)


def test_equal_widths_pull_the_generator_mean_toward_the_data():
    # c_r = c_f: a = 0 and dl/dx_g = k^2 (mu_g - mu) / w with k = 1 - c (1 - t) > 0, per sample.
    mu, mu_g, s = torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 1.0]), 0.5
    generator_net, teacher = GaussianGenerator(mu_g, s), RecordingTeacher(mu, s)
    sample, grad_x, _ = generator_step(make_method(teacher), generator_net, GaussianScore(mu_g, s))
    direction = (mu_g - mu) / (mu_g - mu).norm()
    # near sigma_min (t ~ 0.002) k^2 ~ 1e-10 is float32 round-off: look where t > 0.05
    away = teacher.calls[-1][1] > 0.05
    cosine = (grad_x[away] @ direction) / grad_x[away].norm(dim=1)
    assert away.sum() > 300 and torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)
    assert torch.dot(generator_net.mu.grad, mu_g - mu) > 0


def test_generator_gradient_with_the_exact_toy2d_teacher():
    means = torch.stack([2 * torch.tensor([torch.cos(torch.tensor(2 * torch.pi * k / 8)),
                                           torch.sin(torch.tensor(2 * torch.pi * k / 8))]) for k in range(8)])
    teacher = RecordingTeacher(wrapped=REGISTRIES.teachers.get("toy2d-exact")(TOY))
    mu_g, s_g = torch.tensor([0.3, -0.2]), 1.5
    generator_net = GaussianGenerator(mu_g, s_g)
    sample, grad_x, _ = generator_step(make_method(teacher), generator_net, GaussianScore(mu_g, s_g), n=256)
    x_t, t = teacher.calls[-1]
    tc = t.reshape(-1, 1)
    eps = (x_t - (1 - tc) * sample) / tc  # the noise the loss drew, recovered from where the teacher was asked
    x_g = sample.double().clone().requires_grad_(True)
    x = (1 - tc.double()) * x_g + tc.double() * eps.double()
    d_real = mixture_x0(x, t.double(), means.double(), TOY.std).double()
    d_fake = gaussian_x0(x, t.double(), mu_g.double(), s_g)
    w = (x_g - d_real).detach().abs().mean(1, keepdim=True).clamp_min(1e-5)
    delta = d_real - d_fake
    (expected,) = torch.autograd.grad((delta * ((d_real - x_g) - 1.2 * delta) / w).mean(), x_g)
    torch.testing.assert_close(grad_x.double(), expected, rtol=5e-3, atol=1e-7)


def test_no_gradient_when_the_generator_already_matches_the_teacher():
    mu, s = torch.tensor([0.5, 0.25]), 0.7
    _, grad_x, _ = generator_step(make_method(RecordingTeacher(mu, s)), GaussianGenerator(mu, s), GaussianScore(mu, s))
    assert grad_x.abs().max() < 1e-7


def test_a_teacher_without_input_gradients_is_refused():
    class Detached(RecordingTeacher):
        def velocity(self, x, t, cond=None):
            return super().velocity(x, t, cond).detach()

    mu, s = torch.tensor([0.5, 0.25]), 0.7
    with pytest.raises(distillkit.UsageError, match="differentiates the teacher's velocity"):
        generator_step(make_method(Detached(mu, s)), GaussianGenerator(mu, s), GaussianScore(mu, s))


# -- plan and costs -------------------------------------------------------------------------

def test_update_plan_alternates_one_fake_score_and_one_generator_update_every_step(tmp_path):
    method = make_method(None)
    for step in range(6):
        assert method.update_plan(step) == (Update("fake_score", ("fake_score",)), Update("generator", ("generator",)))
    payload = load_checkpoint(run(toy2d_tree("sid", 3), tmp_path).checkpoint)
    assert payload["optimizers"]["generator"]["state"][0]["step"] == 3
    assert payload["optimizers"]["fake_score"]["state"][0]["step"] == 3


def test_evaluations_per_step_are_the_counted_calls():
    counter = CallCounter()
    method = make_method(CountingTeacher(REGISTRIES.teachers.get("toy2d-exact")(TOY), counter))
    mlp = REGISTRIES.backbones.get("mlp")
    config = mlp.config_class(hidden=16, layers=1, time_embedding_dim=8)
    networks = method.build_networks(lambda conditioning=(): mlp.build(config, DataSpec((2,))))
    counted = {name: Counted(network, counter) for name, network in networks.items()}
    batch = Batch(torch.randn(8, 2, generator=torch.Generator().manual_seed(0)))
    for update in method.update_plan(0):
        for name, network in networks.items():
            network.requires_grad_(name in update.networks)
        method.update_loss(counted, update, batch, torch.Generator().manual_seed(0), 0).loss.backward()
    # fake-score update: generator (no grad) + fake score; generator update: generator + teacher
    # + fake score, the last two carrying the input gradient to the generator
    assert counter.counts == {"with_grad": 4, "no_grad": 1} == method.network_evals_per_step()


# -- conformance, resume, demonstration -------------------------------------------------------

class TestSiD(MethodConformance):
    method_name = "sid"


class TestSiDOnLabelledImages(MethodConformance):
    method_name = "sid"
    dataset = "digits"
    dataset_options = {"class_conditional": True}
    backbone = "unet"
    backbone_options = {"channels": 8, "channel_mult": [1], "num_groups": 4, "time_embedding_dim": 16}
    batch_size = 8

    def make_teacher(self, dataset):
        from test_method_conformance import LabelledTeacher

        return LabelledTeacher()


def test_resume_is_bitwise_for_both_networks(tmp_path):
    payload = assert_resume_is_bitwise("sid", tmp_path)
    assert payload["optimizers"]["generator"]["state"][0]["step"] == 12


def test_toy2d_demonstration_beats_an_untrained_generator(tmp_path):
    # 400 steps (400 updates of each network) with the exact toy2d teacher; measured: 0.48 -> 0.10.
    before, after, _ = demonstration("sid", 400, tmp_path, fake_lr=2e-3)
    assert after < 0.4 * before, (before, after)
