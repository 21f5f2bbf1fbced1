"""The ``sid`` method: a data-free one-step generator, a fake score, and the SiD loss."""

from __future__ import annotations

import math

import attrs
import torch

import distillkit
from distillkit import LossOutput, Method, SamplingModel, Update, broadcast_time, generator_x0, straight_path, validators

GENERATOR, FAKE_SCORE = "generator", "fake_score"


def _time(instance, attribute, value) -> None:
    validators.require(validators.is_number(value) and 0.0 < value <= 1.0, attribute, value, "a number in (0, 1]")


def _real(instance, attribute, value) -> None:
    validators.require(validators.is_number(value) and math.isfinite(value), attribute, value, "a finite number")


@attrs.frozen
class SiDConfig:
    #: the SiD loss's alpha (the paper's default 1.2; 1 is the plain identity-based loss)
    alpha: float = attrs.field(default=1.2, validator=_real)
    #: the time the generator reads its noise at (EDM sigma_init = 2.5: t = 2.5 / 3.5)
    generator_time: float = attrs.field(default=2.5 / 3.5, validator=_time)
    #: the generator loss's noise levels: EDM's rho-ramp from sigma_min, over the share
    #: ``generator_t_max`` of the way to sigma_max (the paper's tmax = 800 of 1000: sigma <= 24.4)
    sigma_min: float = attrs.field(default=0.002, validator=validators.positive_number)
    sigma_max: float = attrs.field(default=80.0, validator=validators.positive_number)
    rho: float = attrs.field(default=7.0, validator=validators.positive_number)
    generator_t_max: float = attrs.field(default=0.8, validator=_time)
    #: the fake score's noise levels: EDM's log-normal, ln sigma ~ N(p_mean, p_std^2)
    fake_p_mean: float = attrs.field(default=-1.2, validator=_real)
    fake_p_std: float = attrs.field(default=1.2, validator=validators.positive_number)
    #: the fake score's denoising loss weight: "edm" (the paper's) or "none"
    fake_weighting: str = attrs.field(default="edm", validator=validators.one_of("edm", "none"))
    sigma_data: float = attrs.field(default=0.5, validator=validators.positive_number)
    #: start both networks from the teacher's weights (a checkpoint teacher of the same architecture)
    init_from_teacher: bool = attrs.field(default=True, validator=validators.boolean)




class SiD(Method):
    name = "sid"
    config_class = SiDConfig
    requires_teacher = True
    sampling_network = GENERATOR
    default_sampler = "consistency"
    provides = frozenset({"denoise", "velocity"})

    def __init__(self, config: SiDConfig, context):
        super().__init__(config, context)
        self.init_source = "random"
        self._networks: dict = {}

    # -- networks -----------------------------------------------------------------------------
    def build_networks(self, make_backbone):
        self._networks = {GENERATOR: make_backbone(), FAKE_SCORE: make_backbone()}
        return dict(self._networks)

    def prepare(self, student, context):
        teacher = self._teacher()
        if self.config.init_from_teacher and distillkit.teacher_network(teacher) is not None:
            for network in (student, self._networks[FAKE_SCORE]):
                if distillkit.copy_teacher_weights(network, teacher) == "random":
                    raise distillkit.ConfigError(
                        "method_options.init_from_teacher", True,
                        "false, or a teacher whose network has this run's architecture (sid starts its generator and "
                        f"fake score from the teacher; teacher {teacher.identity} has other network shapes)",
                    )
            self.init_source = "teacher"

    def update_plan(self, step):
        # The paper's iteration: one fake-score update, then one generator update, each on fresh samples.
        return (Update("fake_score", (FAKE_SCORE,)), Update("generator", (GENERATOR,)))

    def _teacher(self):
        if self.context.teacher is None:
            raise distillkit.UsageError("sid distils a teacher: pass --teacher (a run id, a checkpoint file or a teacher name)")
        return self.context.teacher

    def teacher_velocity(self, x_t, t, cond):
        """The teacher's velocity, differentiable in ``x_t``: the SiD loss reaches the generator
        through the teacher's input. A checkpoint teacher's ``velocity`` is gradient-free, so its
        trained network (a ``distillkit.TrainedModel``) is called directly."""
        teacher = self._teacher()
        trained = getattr(teacher, "trained", None)
        if isinstance(trained, distillkit.TrainedModel):
            return trained.velocity_fn(cond)(x_t, t)
        velocity = teacher.velocity(x_t, t, cond)
        if x_t.requires_grad and not velocity.requires_grad:
            raise distillkit.UsageError(
                f"sid differentiates the teacher's velocity in x, but teacher {teacher.identity} returns it without a "
                "gradient: use a checkpoint or run teacher, or an analytic teacher written in torch")
        return velocity

    # -- sampling -----------------------------------------------------------------------------
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
    def generate(self, network, batch, generator) -> torch.Tensor:
        x = batch.x
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.denoise(network, eps, torch.ones(x.shape[0], device=x.device, dtype=x.dtype), batch.cond)

    def generator_times(self, n: int, like: torch.Tensor, generator) -> torch.Tensor:
        """t = sigma / (1 + sigma), sigma = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
        u ~ U(0, generator_t_max)."""
        c = self.config
        u = c.generator_t_max * torch.rand(n, generator=generator, device=like.device, dtype=like.dtype)
        low, high = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
        sigma = (low + u * (high - low)) ** c.rho
        return sigma / (1 + sigma)

    def update_loss(self, networks, update, batch, generator, step):
        if update.loss == "fake_score":
            return self.fake_score_loss(networks, batch, generator)
        return self.generator_loss(networks, batch, generator)

    def generator_loss(self, networks, batch, generator) -> LossOutput:
        """Per element, with x_t = (1 - t) x_g + t eps (no stop-gradient: the gradient reaches x_g
        through both scores' inputs), x0 = x_t - t v, delta = x0_real - x0_fake and
        w = sg(mean_pixels |x_g - x0_real|):

            l = delta * ((x0_real - x_g) - alpha * delta) / w
              = ((1 - alpha) |delta|^2 + delta . (x0_fake - x_g)) / w,

        averaged over elements (the paper sums over pixels and scales by 100: a constant, which
        Adam does not see)."""
        cond = batch.cond
        sample = self.generate(networks[GENERATOR], batch, generator)
        t = self.generator_times(sample.shape[0], sample, generator)
        eps = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        x_t, _ = straight_path(sample, eps, t)
        tb = broadcast_time(t, sample)
        x0_real = x_t - tb * self.teacher_velocity(x_t, t, cond)
        x0_fake = x_t - tb * networks[FAKE_SCORE](x_t, t, cond)
        scale = (sample - x0_real).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
        delta = x0_real - x0_fake
        per_element = delta * ((x0_real - sample) - self.config.alpha * delta) / broadcast_time(scale, sample)
        loss = per_element.mean()
        return LossOutput(loss, {"score_gap": delta.detach().square().mean(), "scale": scale.mean().detach()})

    def fake_score_loss(self, networks, batch, generator) -> LossOutput:
        """EDM's denoising loss on sg(x_g) as flow matching: ln sigma ~ N(p_mean, p_std^2),
        t = sigma / (1 + sigma), weight (t^2 + sigma_d^2 (1 - t)^2) / sigma_d^2 on |v - (eps - x_g)|^2
        (EDM's (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 on |D - x_g|^2, as D - x = -t (v - v*))."""
        with torch.no_grad():
            sample = self.generate(networks[GENERATOR], batch, generator)
        n = sample.shape[0]
        kw = dict(generator=generator, device=sample.device, dtype=sample.dtype)
        sigma = torch.exp(self.config.fake_p_mean + self.config.fake_p_std * torch.randn(n, **kw))
        t = sigma / (1 + sigma)
        eps = torch.randn(sample.shape, **kw)
        x_t, target = straight_path(sample, eps, t)
        error = (networks[FAKE_SCORE](x_t, t, batch.cond) - target).square().flatten(1).mean(1)
        if self.config.fake_weighting == "edm":
            sd2 = self.config.sigma_data**2
            error = error * (t.square() + sd2 * (1 - t).square()) / sd2
        return LossOutput(error.mean(), {"t_mean": t.mean()})

    # -- costs and tags -----------------------------------------------------------------------
    def network_evals_per_step(self):
        # fake-score update: the generator (no grad) and the fake score (with grad); generator
        # update: the generator, and the teacher and fake score, whose input gradients reach it.
        return {"with_grad": 4, "no_grad": 1}

    def tags(self):
        return {"distillkit.sid.init": self.init_source, "distillkit.sid.alpha": str(self.config.alpha)}
