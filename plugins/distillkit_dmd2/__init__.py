"""DMD2, "Improved Distribution Matching Distillation for Fast Image Synthesis" (Yin, Gharbi,
Park, Zhang, Shechtman, Durand, Freeman; NeurIPS 2024, arXiv 2405.14867), as a distillkit plugin
written from the mathematics (docs/baselines.md#dmd2).

Two networks, each with its own optimizer: the generator G (sampled, one step or k steps) and the
fake score v_fake, a velocity network that learns the generator's own distribution. The teacher
(``--teacher``) is the real score. In distillkit's time (t = 0 data, x_t = (1 - t) x + t eps,
x0 = x_t - t v):

- generator update: x_g = G(eps); x_t = (1 - t) x_g + t eps' with EDM's sigma on the Karras grid
  (index in [20, 980] of 1000, t = sigma / (1 + sigma));
  g = (x0_fake(x_t) - x0_real(x_t)) / mean_pixels |x_g - x0_real(x_t)| (no gradient);
  L_G = 1/2 mean(|x_g - sg(x_g - g)|^2) [+ lambda_G softplus(-logit(x_g noised))];
- fake-score update: EDM-weighted flow matching on sg(x_g) [+ lambda_D classifier loss];
- the plan: a fake-score update every step, and a generator update after every
  ``fake_updates_per_generator``-th (5) of them.
"""

from distillkit import hookimpl

from .method import DMD2, DMD2Config

__all__ = ["DMD2", "DMD2Config"]


@hookimpl
def distillkit_register_methods(register):
    register(DMD2)
