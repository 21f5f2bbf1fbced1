"""``--teacher edm:FILE[,precond=edm|vp|ve,...]``: a network trained with EDM's code as a teacher.

FILE is a state dict of EDM's ``SongUNet`` (DDPM++) or ``DhariwalUNet`` (ADM): a ``.safetensors``
file, or a torch file read with ``weights_only=True`` (tensors only). Keys may carry the
``model.`` prefix of EDM's preconditioning wrapper. The architecture is read off the names and
shapes; the weights go into the ``songunet`` / ``adm`` backbone (EDM's names map one to one onto
theirs, see distillkit_backbones/edm_layout.py).

EDM's own ``.pkl`` snapshots pickle Python code: they are never unpickled here. Convert one in
EDM's own environment (docs/teachers.md):

    net = pickle.load(open("edm.pkl", "rb"))["ema"]
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.model.state_dict().items()}, "edm.safetensors")

The network F is wrapped in the preconditioning it was trained with (``precond``; written from
EDM's paper, table 1), giving the denoiser D(y; sigma) = c_skip y + c_out F(c_in y, c_noise):

- ``edm``: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
  c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (sd = ``sigma_data``, 0.5);
- ``vp``: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) s(sigma),
  s the VP time of sigma: s = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d;
- ``ve``: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2).

In our time: sigma = t / (1 - t), y = x_t / (1 - t), v = (x_t - D(y; sigma)) / t. t is clamped to
the noise levels the network was trained on, [sigma_min, sigma_max] (EDM: 0.002 .. 80; VP:
sigma(1e-5) .. sigma(1); VE: 0.02 .. 100), so t = 0 and t = 1 give the velocity at the nearest end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

import distillkit
from distillkit import Teacher, TeacherContext

from .conversion import denoiser_to_velocity, edm_sigma_of_time, time_of_edm_sigma
from .spec import check_data_shape, files_sha256, require_existing, split_spec

WHAT = "edm:FILE, a state dict (.safetensors, or a torch file of tensors) of EDM's SongUNet or DhariwalUNet"
PRECONDITIONINGS = ("edm", "vp", "ve")
OPTIONS = {"precond": "edm|vp|ve", "sigma_data": "a positive number (edm; 0.5)",
           "sigma_min": "a positive number", "sigma_max": "a positive number",
           "beta_d": "a number (vp; 19.9)", "beta_min": "a number (vp; 0.1)", "M": "an integer (vp; 1000)"}
VP_DEFAULTS = {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}


def refuse_pickle(spec: str, path: Path) -> None:
    raise distillkit.ConfigError(
        "teacher", spec,
        "a state dict, not an EDM .pkl (pickles run code and are never loaded): in EDM's environment load the "
        "pickle and save net.model.state_dict() with safetensors.torch.save_file, then pass edm:FILE.safetensors "
        "(docs/teachers.md)",
    )


def read_state_dict(spec: str, path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() in (".pkl", ".pickle"):
        refuse_pickle(spec, path)
    if path.suffix.lower() == ".safetensors":
        try:
            import safetensors.torch  # noqa: F401  (an optional extra)
        except ImportError:
            raise distillkit.UsageError(f"teacher {spec!r} needs the safetensors package: pip install distillkit[diffusers]") from None
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / torch raise many types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise distillkit.ConfigError("teacher", spec, f"{WHAT}; it cannot be read ({first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise distillkit.ConfigError("teacher", spec, f"{WHAT}; the file holds no flat dict of tensors")
    if all(key.startswith("model.") for key in state):  # saved from EDM's preconditioning wrapper
        state = {key[len("model."):]: value for key, value in state.items()}
    return state


def _number(spec: str, options: dict, key: str, default: float) -> float:
    try:
        value = float(options.get(key, default))
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise distillkit.ConfigError("teacher", spec, f"{key}={OPTIONS[key]}")
    return value


class Preconditioning:
    """EDM's D(y; sigma) = c_skip y + c_out F(c_in y, c_noise) for one of its three schemes."""

    def __init__(self, spec: str, options: dict):
        self.kind = options.get("precond", "edm")
        if self.kind not in PRECONDITIONINGS:
            raise distillkit.ConfigError("teacher", spec, f"precond={'|'.join(PRECONDITIONINGS)}")
        self.sigma_data = _number(spec, options, "sigma_data", 0.5)
        self.beta_d = _number(spec, options, "beta_d", VP_DEFAULTS["beta_d"])
        self.beta_min = _number(spec, options, "beta_min", VP_DEFAULTS["beta_min"])
        self.M = int(_number(spec, options, "M", VP_DEFAULTS["M"]))
        low, high = {"edm": (0.002, 80.0), "ve": (0.02, 100.0),
                     "vp": (self.vp_sigma(VP_DEFAULTS["epsilon_t"]), self.vp_sigma(1.0))}[self.kind]
        self.sigma_min = _number(spec, options, "sigma_min", low)
        self.sigma_max = _number(spec, options, "sigma_max", high)
        if not 0 < self.sigma_min < self.sigma_max:
            raise distillkit.ConfigError("teacher", spec, "0 < sigma_min < sigma_max")

    def vp_sigma(self, s: float) -> float:
        return math.sqrt(math.exp(0.5 * self.beta_d * s * s + self.beta_min * s) - 1.0)

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) at ``sigma`` (float64)."""
        if self.kind == "edm":
            sd2 = self.sigma_data**2
            total = sigma**2 + sd2
            return sd2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4
        if self.kind == "vp":
            s = (torch.sqrt(self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)) - self.beta_min) / self.beta_d
            return torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1), (self.M - 1) * s
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(0.5 * sigma)

    def describe(self) -> str:
        extra = f",sigma_data={self.sigma_data}" if self.kind == "edm" else (
            f",beta_d={self.beta_d},beta_min={self.beta_min},M={self.M}" if self.kind == "vp" else "")
        return f"precond={self.kind}{extra},sigma=[{self.sigma_min:g},{self.sigma_max:g}]"


class EdmTeacher(Teacher):
    name = "edm"

    def __init__(self, network, preconditioning: Preconditioning, identity: str):
        self.network = network
        self.preconditioning = preconditioning
        self.identity = identity
        self.t_min = time_of_edm_sigma(preconditioning.sigma_min)
        self.t_max = time_of_edm_sigma(preconditioning.sigma_max)
        #: the backbone and options under which a student has this teacher's architecture
        self.student_backbone = (network.name, dict(network.backbone_options))

    @classmethod
    def from_spec(cls, spec: str, context: TeacherContext) -> Optional["EdmTeacher"]:
        parsed = split_spec(spec, cls.name, OPTIONS)
        if parsed is None:
            return None
        path, options = parsed
        if path.suffix.lower() in (".pkl", ".pickle"):
            refuse_pickle(spec, path)  # before anything else: even a missing .pkl gets the route
        path = require_existing(spec, path, WHAT)
        preconditioning = Preconditioning(spec, options)
        state = read_state_dict(spec, path)
        kind = "adm" if "out_conv.weight" in state else "songunet"
        backbone = distillkit.get_registries().backbones.get(kind)
        try:
            network = backbone.from_edm_state_dict(state, source=str(path))
        except distillkit.UsageError as exc:
            raise distillkit.ConfigError("teacher", spec, f"{WHAT}; {exc}") from None
        check_data_shape(spec, network.data.shape, network.data.num_classes, context.data)
        network = network.to(context.device).eval().requires_grad_(False)
        identity = f"edm:{path} {preconditioning.describe()} sha256:{files_sha256([path])}"
        return cls(network, preconditioning, identity)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
        t = t.clamp(self.t_min, self.t_max)
        sigma = edm_sigma_of_time(t)
        c_skip, c_out, c_in, c_noise = self.preconditioning.coefficients(sigma)
        column = lambda value: distillkit.broadcast_time(value, x)  # noqa: E731
        x64 = x.to(torch.float64)
        y = x64 / column(1 - t)
        features = self.network((column(c_in) * y).to(torch.float32), c_noise.to(torch.float32), cond)
        denoised = column(c_skip) * y + column(c_out) * features.to(torch.float64)
        return denoiser_to_velocity(denoised, x64, column(t)).to(x.dtype)
