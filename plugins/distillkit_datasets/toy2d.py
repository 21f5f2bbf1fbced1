"""``toy2d``: a 2-D mixture of Gaussians with an exact sampler and an exact velocity field.

``components`` isotropic Gaussians of standard deviation ``std``, with equal weights and means
equally spaced on a circle of radius ``radius``. Because the data distribution is known, the
marginal velocity of the straight path is known in closed form (``gmm_velocity``), which makes
this dataset's teacher (``toy2d-exact``) exact: a distilled sampler can be compared with the true
ODE flow with no trained teacher in between.
"""

from __future__ import annotations

import math
from typing import Optional

import attrs
import torch

import distillkit
from distillkit import DataSpec, Dataset, Teacher, validators

from .digits import SampleTensorDataset

TOY2D_DIM = 2


def _non_negative_int(instance, attribute, value) -> None:
    if not (validators.is_int(value) and value >= 0):
        raise distillkit.ConfigError(attribute.name, value, "a non-negative integer")


def _positive_number(instance, attribute, value) -> None:
    if not (isinstance(value, float) and math.isfinite(value) and value > 0):
        raise distillkit.ConfigError(attribute.name, value, "a positive number")


def _to_float(value):
    return float(value) if validators.is_int(value) else value


@attrs.frozen
class Toy2dConfig:
    """Options of the ``toy2d`` dataset and of the ``toy2d-exact`` teacher."""

    components: int = attrs.field(default=8, validator=validators.positive_int)
    #: radius of the circle the component means lie on
    radius: float = attrs.field(default=2.0, converter=_to_float, validator=_positive_number)
    #: standard deviation of every component (> 0 keeps the velocity finite at t = 0)
    std: float = attrs.field(default=0.15, converter=_to_float, validator=_positive_number)
    #: number of samples in the fixed training set
    train_size: int = attrs.field(default=20000, validator=validators.positive_int)
    #: seed of the training set (reference samples use the caller's generator)
    seed: int = attrs.field(default=0, validator=_non_negative_int)


def mixture_parameters(config: Toy2dConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means ``[K, 2]``, standard deviations ``[K]`` and weights ``[K]`` (float32)."""
    k = config.components
    angles = 2.0 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = config.radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    stds = torch.full((k,), config.std, dtype=torch.float64)
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    return means.float(), stds.float(), weights.float()


def sample_mixture(
    means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` exact samples ``[n, D]`` and the component each came from ``[n]``."""
    components = torch.multinomial(weights, n, replacement=True, generator=generator)
    noise = torch.randn(n, means.shape[1], generator=generator, dtype=means.dtype)
    return means[components] + stds[components, None] * noise, components


def gmm_velocity(
    x: torch.Tensor, t, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The exact marginal velocity ``E[eps - x0 | x_t = x]`` of ``x_t = (1 - t) x0 + t eps``.

    ``x0`` follows the mixture (``means [K, D]``, isotropic ``stds [K]``, ``weights [K]``) and
    ``eps ~ N(0, I)``. Given component k, ``x_t ~ N((1 - t) mu_k, s_k^2 I)`` with
    ``s_k^2 = (1 - t)^2 std_k^2 + t^2``, and Gaussian conditioning gives

        E[x0  | x_t, k] = mu_k + (1 - t) std_k^2 / s_k^2 * (x_t - (1 - t) mu_k)
        E[eps | x_t, k] = t / s_k^2 * (x_t - (1 - t) mu_k)

    which are averaged with the posterior responsibilities of the components, computed in log
    space so that far-away points (large ``|x|`` at small t) do not underflow. ``t`` is a
    tensor ``[batch]`` or a scalar, anywhere in [0, 1]; at t = 0 the result is finite as long
    as every std is positive.
    """
    batch, dim = x.shape
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.reshape(1).expand(batch) if t.numel() == 1 else t.reshape(batch)
    means, stds, weights = (p.to(device=x.device, dtype=x.dtype) for p in (means, stds, weights))

    t_col = t[:, None]  # [B, 1], broadcasts against the component axis
    variances = (1 - t_col) ** 2 * stds[None, :] ** 2 + t_col**2  # [B, K]
    centred = x[:, None, :] - (1 - t_col)[:, :, None] * means[None, :, :]  # [B, K, D]
    log_likelihood = -0.5 * centred.square().sum(-1) / variances - 0.5 * dim * torch.log(2 * math.pi * variances)
    responsibilities = torch.softmax(torch.log(weights)[None, :] + log_likelihood, dim=1)  # [B, K]

    # E[eps - x0 | x_t, k] = (t - (1 - t) std_k^2) / s_k^2 * (x_t - (1 - t) mu_k) - mu_k
    slope = (t_col - (1 - t_col) * stds[None, :] ** 2) / variances
    component_velocity = slope[:, :, None] * centred - means[None, :, :]
    return (responsibilities[:, :, None] * component_velocity).sum(dim=1)


class Toy2d(Dataset):
    name = "toy2d"
    config_class = Toy2dConfig
    default_backbone = "mlp"
    data_kind = "vectors"

    def __init__(self, config: Optional[Toy2dConfig] = None, data_root: Optional[str] = None):
        super().__init__(config if config is not None else Toy2dConfig(), data_root)

    @property
    def spec(self) -> DataSpec:
        return DataSpec((TOY2D_DIM,), None)

    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Means ``[K, 2]``, standard deviations ``[K]``, weights ``[K]``."""
        return mixture_parameters(self.config)

    def sample(self, n: int, generator: torch.Generator, *, return_components: bool = False):
        """``n`` exact samples ``[n, 2]`` (and, if asked, the component index of each)."""
        samples, components = sample_mixture(*self.mixture(), n, generator)
        return (samples, components) if return_components else samples

    def train_set(self) -> torch.utils.data.Dataset:
        generator = torch.Generator().manual_seed(self.config.seed)
        return SampleTensorDataset(self.sample(self.config.train_size, generator))

    def reference_samples(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Fresh exact samples: the mixture has no finite pool to run out of."""
        return self.sample(n, generator)


class Toy2dExactTeacher(Teacher):
    """The exact velocity field of the ``toy2d`` mixture (same options as the dataset)."""

    name = "toy2d-exact"
    config_class = Toy2dConfig

    def __init__(self, config: Optional[Toy2dConfig] = None):
        self.config = config if config is not None else Toy2dConfig()
        self.means, self.stds, self.weights = mixture_parameters(self.config)
        # train_size and seed change the training set, not the field, so they are not part of it.
        self.identity = (
            f"{self.name}:components={self.config.components},radius={self.config.radius},std={self.config.std}"
        )

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cond is not None:
            raise ValueError("the toy2d mixture has no classes; the toy2d-exact teacher takes no cond")
        return gmm_velocity(x, t, self.means, self.stds, self.weights)
