"""Built-in data: ``digits`` (scikit-learn's 8x8 digits) and ``toy2d`` (a 2-D Gaussian mixture)
embedded, the mixture's exact velocity field as the teacher ``toy2d-exact``, and the paper's
file-backed image datasets ``mnist``, ``fashion-mnist``, ``cifar10`` and ``imagenet64``."""

from distillkit import hookimpl

from .cifar10 import CIFAR10Config, Cifar10
from .digits import Digits, DigitsConfig, SampleTensorDataset
from .idx import FashionMnist, IdxConfig, Mnist
from .images import UInt8Images
from .imagenet64 import ImageNet64, ImageNet64Config
from .toy2d import Toy2d, Toy2dConfig, Toy2dExactTeacher, gmm_velocity, mixture_parameters, sample_mixture

__all__ = [
    "CIFAR10Config",
    "Cifar10",
    "Digits",
    "DigitsConfig",
    "FashionMnist",
    "IdxConfig",
    "ImageNet64",
    "ImageNet64Config",
    "Mnist",
    "SampleTensorDataset",
    "Toy2d",
    "Toy2dConfig",
    "Toy2dExactTeacher",
    "UInt8Images",
    "gmm_velocity",
    "mixture_parameters",
    "sample_mixture",
]


@hookimpl
def distillkit_register_datasets(register):
    register(Digits)
    register(Toy2d)
    register(Mnist)
    register(FashionMnist)
    register(Cifar10)
    register(ImageNet64)


@hookimpl
def distillkit_register_teachers(register):
    register(Toy2dExactTeacher)
