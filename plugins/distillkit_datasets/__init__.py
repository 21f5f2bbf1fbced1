"""Built-in data: ``digits`` (scikit-learn's 8x8 digits), ``toy2d`` (a 2-D Gaussian mixture) and
the mixture's exact velocity field as the teacher ``toy2d-exact``."""

from distillkit import hookimpl

from .digits import Digits, DigitsConfig, SampleTensorDataset
from .toy2d import Toy2d, Toy2dConfig, Toy2dExactTeacher, gmm_velocity, mixture_parameters, sample_mixture

__all__ = [
    "Digits",
    "DigitsConfig",
    "SampleTensorDataset",
    "Toy2d",
    "Toy2dConfig",
    "Toy2dExactTeacher",
    "gmm_velocity",
    "mixture_parameters",
    "sample_mixture",
]


@hookimpl
def distillkit_register_datasets(register):
    register(Digits)
    register(Toy2d)


@hookimpl
def distillkit_register_teachers(register):
    register(Toy2dExactTeacher)
