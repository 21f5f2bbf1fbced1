"""Built-in networks: ``unet`` (small, images [C, H, W]), ``mlp`` (vectors [D]), and the
paper-scale U-Nets ``songunet`` (DDPM++, MNIST / CIFAR-10 presets) and ``adm`` (ADM,
ImageNet-64 preset)."""

from distillkit import hookimpl

from .adm import ADM, ADMConfig
from .mlp import MLP, MLPConfig
from .songunet import SongUNet, SongUNetConfig
from .unet import UNet, UNetConfig

__all__ = ["ADM", "ADMConfig", "MLP", "MLPConfig", "SongUNet", "SongUNetConfig", "UNet", "UNetConfig"]


@hookimpl
def distillkit_register_backbones(register):
    register(UNet)
    register(MLP)
    register(SongUNet)
    register(ADM)
