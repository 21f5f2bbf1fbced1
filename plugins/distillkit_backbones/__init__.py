"""Built-in networks: ``unet`` for images [C, H, W] and ``mlp`` for vectors [D]."""

from distillkit import hookimpl

from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

__all__ = ["MLP", "MLPConfig", "UNet", "UNetConfig"]


@hookimpl
def distillkit_register_backbones(register):
    register(UNet)
    register(MLP)
