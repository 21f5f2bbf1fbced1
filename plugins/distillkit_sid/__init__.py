"""SiD, "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion
Models for One-Step Generation" (Zhou, Zheng, Wang, Yin, Huang; ICML 2024, arXiv 2404.04057), as
a distillkit plugin written from the mathematics (docs/baselines.md#sid).

Data-free: the generator x_g = G(eps) and the fake score f_psi (a velocity network fitted to the
generator's samples) both start from the teacher (``--teacher``). Each step: one fake-score
update (EDM-weighted flow matching on sg(x_g)), then one generator update with the SiD loss

    l = (x0_real - x0_fake) . ((x0_real - x_g) - alpha (x0_real - x0_fake)) / sg(mean |x_g - x0_real|)

at x_t = (1 - t) x_g + t eps, x0 = x_t - t v, gradients reaching x_g through both networks'
inputs (their weights frozen). alpha = 1.2 as in the paper.
"""

from distillkit import hookimpl

from .method import SiD, SiDConfig

__all__ = ["SiD", "SiDConfig"]


@hookimpl
def distillkit_register_methods(register):
    register(SiD)
