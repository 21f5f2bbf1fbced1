"""A two-network distribution-matching method (a toy DMD), as a third-party distillkit plugin.

Networks (each with its own optimizer, schedule, clipping and checkpoint; the trainer does that):

- ``generator`` G maps noise to a sample in one evaluation, x = G(eps, 1);
- ``fake_score`` v_fake learns the velocity of the straight path from the *generator's* samples.

The update plan alternates: ``fake_updates`` fake-score updates, then one generator update.

- fake score: flow matching on sg(x): |v_fake(x_t, t) - (eps' - x)|^2, x_t = (1 - t) x + t eps';
- generator (distribution matching, Yin et al. 2024, in this time convention): with x0 estimates
  x0_real = x_t - t v_teacher(x_t, t) and x0_fake = x_t - t v_fake(x_t, t), the gradient of the
  reverse KL along x is proportional to x0_fake - x0_real; normalised by mean |x - x0_real| and
  applied as the loss |x - sg(x - grad)|^2 / 2.

The teacher is any ``--teacher`` (the exact ``toy2d-exact`` field on toy2d). Sampling: the
``onestep`` sampler, x = G(eps, 1). The metric ``missed_modes``: the share of a toy2d mixture's
modes that receive less than half their fair share of samples within three standard deviations.
"""

from __future__ import annotations

import math

import attrs
import torch

from distillkit import (LossOutput, Method, Metric, Sampler, SamplingModel, Update, broadcast_time, hookimpl,
                        straight_path, validators)


@attrs.frozen
class ToyDMDConfig:
    #: fake-score updates per generator update
    fake_updates: int = attrs.field(default=2, validator=validators.positive_int)
    #: the fake score's learning rate (the generator's is train.lr)
    fake_score_lr: float = attrs.field(default=2e-3, validator=validators.positive_number)
    #: times are drawn in [t_min, 1 - t_min]
    t_min: float = attrs.field(default=0.02, validator=validators.unit_interval)


class ToyDMD(Method):
    name = "toy-dmd"
    config_class = ToyDMDConfig
    requires_teacher = True
    sampling_network = "generator"
    default_sampler = "onestep"
    provides = frozenset({"denoise", "velocity"})

    def build_networks(self, make_backbone):
        return {"generator": make_backbone(), "fake_score": make_backbone()}

    def optimizer_config(self, network, default):
        if network == "fake_score":
            return attrs.evolve(default, optimizer="adamw", lr=self.config.fake_score_lr, weight_decay=1e-4)
        return default

    def update_plan(self, step):
        if step % (self.config.fake_updates + 1) == self.config.fake_updates:
            return (Update("generator", ("generator",)),)
        return (Update("fake_score", ("fake_score",)),)

    def update_loss(self, networks, update, batch, generator, step):
        x, cond = batch.x, batch.cond
        n = x.shape[0]
        kw = dict(generator=generator, device=x.device, dtype=x.dtype)
        ones = torch.ones(n, device=x.device, dtype=x.dtype)
        sample = networks["generator"](torch.randn(x.shape, **kw), ones, cond)
        t = self.config.t_min + (1 - 2 * self.config.t_min) * torch.rand(n, **kw)
        eps = torch.randn(x.shape, **kw)
        if update.loss == "fake_score":
            x_t, velocity = straight_path(sample.detach(), eps, t)
            loss = torch.nn.functional.mse_loss(networks["fake_score"](x_t, t, cond), velocity)
            return LossOutput(loss)
        with torch.no_grad():
            x_t, _ = straight_path(sample, eps, t)
            x0_real = x_t - broadcast_time(t, x) * self.context.teacher.velocity(x_t, t, cond)
            x0_fake = x_t - broadcast_time(t, x) * networks["fake_score"](x_t, t, cond)
            scale = (sample - x0_real).abs().flatten(1).mean(1).clamp_min(1e-6)
            target = sample - (x0_fake - x0_real) / broadcast_time(scale, x)
        loss = 0.5 * torch.nn.functional.mse_loss(sample, target)
        return LossOutput(loss, {"sample_radius": sample.detach().flatten(1).norm(dim=1).mean()})

    def velocity_fn(self, student, cond=None):
        """The velocity implied by the one-step map: one Euler step from t to 0 lands on G(x, t)."""
        return lambda x, t: (x - student(x, t, cond)) / broadcast_time(t.clamp_min(1e-3), x)

    def sampling_model(self, network, cond=None):
        implied = self.velocity_fn(network, cond)
        return SamplingModel(velocity=lambda x, t, t_next: implied(x, t), denoise=lambda x, t: network(x, t, cond))

    def network_evals_per_step(self):
        return {"with_grad": 1, "no_grad": 2}


class OneStepSampler(Sampler):
    """x = denoise(noise, t_0): a one-step generator's only evaluation."""

    name = "onestep"
    needs = frozenset({"denoise"})

    def steps_for_nfe(self, nfe: int) -> int:
        if nfe != 1:
            raise ValueError("the onestep sampler spends exactly 1 network evaluation")
        return 1

    def sample(self, model, noise, time_grid, fresh_noise):
        start = torch.full((noise.shape[0],), float(time_grid[0]), dtype=noise.dtype, device=noise.device)
        return model.denoise(noise, start)


class MissedModes(Metric):
    """The share of toy2d's mixture modes that get less than half their fair share of samples
    within three standard deviations of their mean (0: every mode covered; lower is better)."""

    name = "missed_modes"
    description = "share of toy2d's mixture modes that the samples miss (mode collapse)"

    def problem(self, context):
        if context.dataset_name != "toy2d":
            return f"missed_modes measures toy2d's mixture; this run's data is {context.dataset_name}"
        return None

    def prepare(self, context):
        config = context.dataset().config
        angles = 2 * math.pi * torch.arange(config.components, dtype=torch.float64) / config.components
        self.means = config.radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        self.radius = 3 * config.std

    def measure(self, generated, context):
        distances = torch.cdist(generated.double().flatten(1), self.means)
        near = distances.min(dim=1).values < self.radius
        counts = torch.bincount(distances.argmin(dim=1)[near], minlength=len(self.means))
        fair = len(generated) / len(self.means)
        return float((counts < fair / 2).double().mean())

    def signature(self):
        return f"modes={len(self.means)} within={self.radius:g}"


@hookimpl
def distillkit_register_methods(register):
    register(ToyDMD)


@hookimpl
def distillkit_register_samplers(register):
    register(OneStepSampler)


@hookimpl
def distillkit_register_metrics(register):
    register(MissedModes)
