"""The ``dmd2`` method: generator and fake score, distribution matching and two time scales."""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

import distillkit
from distillkit import (LossOutput, Method, SamplingModel, Update, broadcast_time, generator_x0, straight_path,
                        validators)

from .networks import FakeScore
from .schedule import edm_velocity_weight, karras_sigmas, sigma_to_t

GENERATOR, FAKE_SCORE = "generator", "fake_score"


def _check_steps(instance, attribute, value) -> None:
    validators.require(value < instance.num_train_timesteps, attribute, value,
                       f"an index below num_train_timesteps ({instance.num_train_timesteps})")
    if attribute.name == "dm_max_step":
        validators.require(value >= instance.dm_min_step, attribute, value,
                           f"at least dm_min_step ({instance.dm_min_step})")


def _time(instance, attribute, value) -> None:
    validators.require(validators.is_number(value) and 0.0 < value <= 1.0, attribute, value, "a number in (0, 1]")


@attrs.frozen
class DMD2Config:
    #: fake-score updates per generator update (the paper's two-time-scale rule, 5)
    fake_updates_per_generator: int = attrs.field(default=5, validator=validators.positive_int)
    #: generator steps k: 1 (one-step), or k > 1 with backward simulation, sampled on the
    #: uniform grid t = 1, (k-1)/k, ..., 1/k with the ``consistency`` sampler at NFE k
    generator_steps: int = attrs.field(default=1, validator=validators.positive_int)
    #: the time the generator's first step reads noise at (EDM sigma_max = 80: 80/81)
    generator_time: float = attrs.field(default=80 / 81, validator=_time)
    #: EDM's Karras noise levels: how many, and their range and rho
    num_train_timesteps: int = attrs.field(default=1000, validator=validators.positive_int)
    sigma_min: float = attrs.field(default=0.002, validator=validators.positive_number)
    sigma_max: float = attrs.field(default=80.0, validator=validators.positive_number)
    rho: float = attrs.field(default=7.0, validator=validators.positive_number)
    #: the distribution-matching loss draws its noise level index uniformly in [min, max] (0.02, 0.98 of 1000)
    dm_min_step: int = attrs.field(default=20, validator=[validators.non_negative_int, _check_steps])
    dm_max_step: int = attrs.field(default=980, validator=[validators.non_negative_int, _check_steps])
    #: the fake score's denoising loss weight: "edm" (the paper's) or "none"
    fake_weighting: str = attrs.field(default="edm", validator=validators.one_of("edm", "none"))
    sigma_data: float = attrs.field(default=0.5, validator=validators.positive_number)
    #: GAN: the generator's non-saturating loss weight (paper 3e-3) and the classifier's (paper 1e-2); 0: off
    gan_generator_weight: float = attrs.field(default=0.0, validator=validators.non_negative_number)
    gan_discriminator_weight: float = attrs.field(default=0.0, validator=validators.non_negative_number)
    #: start both networks from the teacher's weights (a checkpoint teacher of the same architecture)
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)

    @property
    def gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_discriminator_weight > 0


class DMD2(Method):
    name = "dmd2"
    config_class = DMD2Config
    requires_teacher = True
    sampling_network = GENERATOR
    default_sampler = "consistency"
    provides = frozenset({"denoise", "velocity"})

    def __init__(self, config: DMD2Config, context):
        super().__init__(config, context)
        sigmas = karras_sigmas(config.num_train_timesteps, config.sigma_min, config.sigma_max, config.rho)
        self.times = sigma_to_t(sigmas)  # float64, ascending
        self.init_source = "random"
        self._networks: dict = {}

    # -- networks -----------------------------------------------------------------------------
    def build_networks(self, make_backbone):
        generator, backbone = make_backbone(), make_backbone()
        if self.config.gan and distillkit.OUTPUT_HEADS not in getattr(type(backbone), "capabilities", ()):
            # The GAN head reads the backbone's features: an optional capability, needed only with a GAN.
            raise distillkit.ConfigError(
                "method_options.gan_generator_weight", self.config.gan_generator_weight,
                f"0 (and gan_discriminator_weight 0): backbone {getattr(backbone, 'name', type(backbone).__name__)} "
                f"does not provide the {distillkit.OUTPUT_HEADS} features the GAN head reads")
        fake_score = FakeScore(backbone, self.context.data, gan_head=self.config.gan)
        self._networks = {GENERATOR: generator, FAKE_SCORE: fake_score}
        return dict(self._networks)

    def prepare(self, student, context):
        teacher = self._teacher()
        if self.config.init_from_teacher:
            self.init_source = init_from_teacher(self.name, teacher, [student, self._networks[FAKE_SCORE].backbone])

    def update_plan(self, step):
        # Each cycle of fake_updates_per_generator steps: a fake-score update every step, the
        # generator's update after the cycle's last one. (The paper updates the generator first,
        # at step 0 too, where the fake score still equals the teacher: a zero gradient.)
        fake = Update("fake_score", (FAKE_SCORE,))
        if step % self.config.fake_updates_per_generator == self.config.fake_updates_per_generator - 1:
            return (fake, Update("generator", (GENERATOR,)))
        return (fake,)

    def _teacher(self):
        if self.context.teacher is None:
            raise distillkit.UsageError("dmd2 distils a teacher: pass --teacher (a run id, a checkpoint file or a teacher name)")
        return self.context.teacher

    # -- sampling -----------------------------------------------------------------------------
    def generator_times(self) -> list[float]:
        """The times the generator is trained (and sampled) at: 1, (k-1)/k, ..., 1/k."""
        k = self.config.generator_steps
        return [(k - i) / k for i in range(k)]

    def denoise(self, network, x, t, cond=None):
        return generator_x0(network, x, t, cond, self.config.generator_time)

    def sampling_model(self, network, cond=None):
        """The generator as a denoiser, and the velocity it implies (one Euler step from t to 0
        lands on its sample)."""
        return SamplingModel.from_denoiser(lambda x, t: self.denoise(network, x, t, cond))

    def velocity_fn(self, student, cond=None):
        step_velocity = self.sampling_model(student, cond).velocity
        return lambda x, t: step_velocity(x, t, None)

    # -- losses -------------------------------------------------------------------------------
    def _draw_times(self, low: int, high: int, n: int, like: torch.Tensor, generator) -> torch.Tensor:
        index = torch.randint(low, high + 1, (n,), generator=generator, device=like.device)
        return self.times.to(like.device)[index].to(like.dtype)

    def generate(self, network, batch, generator, *, grad: bool) -> torch.Tensor:
        """Generator samples for this batch's labels. A k-step generator runs its own chain without
        gradient (denoise, re-noise with fresh noise to the next time) from noise to a step drawn
        per sample, and is evaluated there, with gradient when ``grad`` (backward simulation)."""
        x, cond = batch.x, batch.cond
        n = x.shape[0]
        kw = dict(generator=generator, device=x.device, dtype=x.dtype)
        state = torch.randn(x.shape, **kw)
        times = torch.tensor(self.generator_times(), device=x.device, dtype=x.dtype)
        t = times[:1].expand(n)
        if len(times) > 1:
            chosen = torch.randint(0, len(times), (n,), generator=generator, device=x.device)
            states = [state]
            with torch.no_grad():
                for j in range(len(times) - 1):
                    sample = self.denoise(network, states[-1], times[j].expand(n), cond)
                    noise = torch.randn(x.shape, **kw)
                    states.append((1 - times[j + 1]) * sample + times[j + 1] * noise)
            state = torch.stack(states)[chosen, torch.arange(n, device=x.device)]
            t = times[chosen]
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return self.denoise(network, state, t, cond)

    def update_loss(self, networks, update, batch, generator, step):
        if update.loss == "fake_score":
            return self.fake_score_loss(networks, batch, generator)
        return self.generator_loss(networks, batch, generator)

    def generator_loss(self, networks, batch, generator) -> LossOutput:
        """L_DM = 1/2 mean(|x_g - sg(x_g - g)|^2): the gradient along x_g is g / numel, with
        g = (x0_fake - x0_real) / mean_pixels |x_g - x0_real| at x_t = (1 - t) x_g + t eps
        (x0 = x_t - t v; the paper's (D_fake - D_real) / w), plus the non-saturating GAN term."""
        teacher, fake_score = self._teacher(), networks[FAKE_SCORE]
        cond = batch.cond
        sample = self.generate(networks[GENERATOR], batch, generator, grad=True)
        n = sample.shape[0]
        t = self._draw_times(self.config.dm_min_step, self.config.dm_max_step, n, sample, generator)
        eps = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        with torch.no_grad():
            x_t, _ = straight_path(sample, eps, t)
            tb = broadcast_time(t, sample)
            x0_real = x_t - tb * teacher.velocity(x_t, t, cond)
            x0_fake = x_t - tb * fake_score(x_t, t, cond)
            scale = (sample - x0_real).abs().flatten(1).mean(1).clamp_min(1e-12)
            gradient = torch.nan_to_num((x0_fake - x0_real) / broadcast_time(scale, sample))
        dm_loss = 0.5 * F.mse_loss(sample, (sample - gradient).detach())
        metrics = {"dm_loss": dm_loss.detach(), "dm_scale": scale.mean()}
        loss = dm_loss
        if self.config.gan_generator_weight > 0:
            t_gan = self._draw_times(0, self.config.num_train_timesteps - 1, n, sample, generator)
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            _, logit = fake_score(straight_path(sample, noise, t_gan)[0], t_gan, cond, with_logit=True)
            gan_loss = F.softplus(-logit).mean()
            loss = loss + self.config.gan_generator_weight * gan_loss
            metrics["gan_loss"] = gan_loss.detach()
        return LossOutput(loss, metrics)

    def fake_score_loss(self, networks, batch, generator) -> LossOutput:
        """Denoising (flow matching) on the generator's samples, x_g under stop-gradient, with
        EDM's weight; with a GAN head also the classifier's loss softplus(l_fake) + softplus(-l_real)
        on noised generator samples (the same pass) and noised real data."""
        fake_score, cond = networks[FAKE_SCORE], batch.cond
        sample = self.generate(networks[GENERATOR], batch, generator, grad=False).detach()
        n = sample.shape[0]
        t = self._draw_times(0, self.config.num_train_timesteps - 1, n, sample, generator)
        eps = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        x_t, target = straight_path(sample, eps, t)
        metrics = {}
        if self.config.gan:
            velocity, logit_fake = fake_score(x_t, t, cond, with_logit=True)
        else:
            velocity = fake_score(x_t, t, cond)
        weight = edm_velocity_weight(t, self.config.sigma_data) if self.config.fake_weighting == "edm" else torch.ones_like(t)
        denoising = (weight * (velocity - target).square().flatten(1).mean(1)).mean()
        loss = denoising
        metrics["denoising_loss"] = denoising.detach()
        if self.config.gan:
            t_real = self._draw_times(0, self.config.num_train_timesteps - 1, n, sample, generator)
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            _, logit_real = fake_score(straight_path(batch.x, noise, t_real)[0], t_real, cond, with_logit=True)
            classifier = F.softplus(logit_fake).mean() + F.softplus(-logit_real).mean()
            loss = loss + self.config.gan_discriminator_weight * classifier
            metrics["classifier_loss"] = classifier.detach()
        return LossOutput(loss, metrics)

    # -- costs and tags -----------------------------------------------------------------------
    def evals_per_cycle(self) -> tuple[int, dict[str, int]]:
        """(steps in one cycle of the plan, evaluations of the whole cycle): each fake-score
        update runs the generator's chain (k, no grad) and the fake score (with grad), plus the
        classifier on real data with a GAN; the generator update runs the chain (k - 1 no grad,
        1 with grad), the teacher and the fake score (no grad), plus a fake-score pass whose
        input gradient reaches the generator with a GAN."""
        k, ratio, gan = self.config.generator_steps, self.config.fake_updates_per_generator, self.config.gan
        fake = {"with_grad": 1 + (1 if gan else 0), "no_grad": k}
        gen = {"with_grad": 1 + (1 if self.config.gan_generator_weight > 0 else 0), "no_grad": (k - 1) + 2}
        return ratio, {key: ratio * fake[key] + gen[key] for key in fake}

    def network_evals_per_step(self):
        """The cycle's evaluations per step, rounded up (so that a comparison never undercounts);
        the exact counts per cycle are in the tags."""
        steps, cycle = self.evals_per_cycle()
        return {key: math.ceil(value / steps) for key, value in cycle.items()}

    def tags(self):
        steps, cycle = self.evals_per_cycle()
        return {
            "distillkit.dmd2.init": self.init_source,
            "distillkit.dmd2.fake_updates_per_generator": str(self.config.fake_updates_per_generator),
            "distillkit.dmd2.generator_steps": str(self.config.generator_steps),
            "distillkit.dmd2.gan": str(self.config.gan).lower(),
            "distillkit.dmd2.evals_per_cycle": f"{cycle['with_grad']} with grad, {cycle['no_grad']} no grad per {steps} steps",
        }


def init_from_teacher(method: str, teacher, networks) -> str:
    """Copy the teacher's network into each of ``networks``: ``teacher`` when it has one of the
    same architecture, ``random`` for an analytic teacher (no weights: the networks keep their
    fresh initialisation); a teacher network of another architecture is refused."""
    if distillkit.teacher_network(teacher) is None:
        return "random"
    for network in networks:
        copied = distillkit.copy_teacher_weights(network, teacher)
        if copied == "random":
            raise distillkit.ConfigError(
                "method_options.init_from_teacher", True,
                f"false, or a teacher whose network has this run's architecture ({method} starts its generator and "
                f"fake score from the teacher; teacher {teacher.identity} has other network shapes)",
            )
    return "teacher"
