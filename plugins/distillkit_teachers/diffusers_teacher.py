"""``--teacher diffusers:PATH``: a pretrained diffusers ``UNet2DModel`` and its scheduler as a teacher.

PATH is a ``save_pretrained`` folder of the UNet (``config.json`` + weights) with its scheduler's
``scheduler_config.json`` beside it or in ``PATH/scheduler``, or a pipeline folder
(``model_index.json`` with ``unet/`` and ``scheduler/``, what ``DDPMPipeline.save_pretrained``
writes). diffusers is imported only here, when such a teacher is asked for.

Two families, told apart by the scheduler (docs/teachers.md has the derivations):

- VP schedulers (DDPM, DDIM, Euler, ...; betas ``linear``, ``scaled_linear``,
  ``squaredcos_cap_v2`` or ``trained_betas``; prediction ``epsilon``, ``v_prediction``,
  ``sample``). The teacher's log-SNR grid is the scheduler's own ``alphas_cumprod``. At our t the
  model sees z = x_t / sqrt((1 - t)^2 + t^2) and the timestep n* interpolated linearly in log-SNR
  (exactly n on the grid); its output is converted to v = eps - x. Times outside the grid's SNR
  range [t(lambda_0), t(lambda_{T-1})] are clamped to it: v(x, t) is the velocity at the nearest
  grid end, which keeps t = 0 and t = 1 finite (the model was never trained beyond them).
- ``FlowMatchEulerDiscreteScheduler``: the model's path is ours with sigma = t and its output is
  eps - x, so v(x_t, t) = model(x_t, T t). The scheduler's ``shift`` (and dynamic shifting) only
  chooses which sigmas a sampler visits; the model is called at the true sigma, so it is not
  applied again here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

import distillkit
from distillkit import Teacher, TeacherContext

from .conversion import (
    PREDICTION_TYPES,
    log_snr_of_schedule,
    log_snr_of_time,
    time_of_log_snr,
    timestep_at_log_snr,
    vp_coefficients,
    vp_prediction_to_velocity,
)
from .spec import check_data_shape, files_sha256, require_diffusers_installed, require_existing, split_spec

WHAT = ("diffusers:PATH, a save_pretrained folder of a UNet2DModel with its scheduler_config.json "
        "(beside it or in scheduler/), or a pipeline folder with model_index.json")
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                 "PNDMScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _read_json(spec: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise distillkit.ConfigError("teacher", spec, f"{WHAT}; {path} cannot be read ({exc})") from None


def locate_model(spec: str, folder: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler folder) of a model or pipeline folder."""
    if (folder / "model_index.json").is_file():
        index = _read_json(spec, folder / "model_index.json")
        if "unet" not in index or "scheduler" not in index:
            parts = ", ".join(k for k in index if not k.startswith("_"))
            raise distillkit.ConfigError("teacher", spec, f"a pipeline with a unet and a scheduler; this one has {parts}")
        unet_dir, scheduler_dir = folder / "unet", folder / "scheduler"
    else:
        unet_dir = folder
        scheduler_dir = folder if (folder / "scheduler_config.json").is_file() else folder / "scheduler"
    if not (unet_dir / "config.json").is_file():
        raise distillkit.ConfigError("teacher", spec, f"{WHAT}; {unet_dir / 'config.json'} is missing")
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise distillkit.ConfigError("teacher", spec, f"{WHAT}; no scheduler_config.json in {folder} or {folder / 'scheduler'}")
    return unet_dir, scheduler_dir


def _image_shape(config: dict) -> tuple[int, int, int]:
    size = config.get("sample_size")
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(config["in_channels"]), int(height), int(width)


def check_unet_config(spec: str, config: dict) -> None:
    name = config.get("_class_name")
    if name != "UNet2DModel":
        raise distillkit.ConfigError(
            "teacher", spec, f"a UNet2DModel (pixel-space, optionally class-conditional); this folder holds a {name}"
        )
    if config.get("class_embed_type") is not None:
        raise distillkit.ConfigError(
            "teacher", spec, f"class labels through num_class_embeds; class_embed_type={config['class_embed_type']!r} is not supported"
        )
    if not isinstance(config.get("sample_size"), (int, list, tuple)):
        raise distillkit.ConfigError("teacher", spec, "a UNet2DModel whose config gives its sample_size")


def check_scheduler_config(spec: str, config: dict) -> str:
    """``vp`` or ``flow``, after refusing what the conversion does not cover."""
    name = config.get("_class_name")
    if name in FLOW_SCHEDULERS:
        return "flow"
    if name not in VP_SCHEDULERS:
        raise distillkit.ConfigError("teacher", spec, f"a scheduler among {', '.join(VP_SCHEDULERS + FLOW_SCHEDULERS)}; got {name}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise distillkit.ConfigError("teacher", spec, f"prediction_type {', '.join(PREDICTION_TYPES)}; the scheduler says {prediction!r}")
    if config.get("rescale_betas_zero_snr"):
        raise distillkit.ConfigError(
            "teacher", spec, "a schedule with positive SNR at every step; rescale_betas_zero_snr=true (zero terminal SNR) is not supported"
        )
    return "vp"


class DiffusersTeacher(Teacher):
    name = "diffusers"

    def __init__(self, unet, scheduler_config: dict, family: str, alphas_cumprod: Optional[torch.Tensor],
                 identity: str, device):
        self.network = unet
        self.unet = unet
        self.family = family
        self.identity = identity
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        # EulerDiscreteScheduler(timestep_type="continuous") feeds the model 0.25 log(sigma_VE).
        self.continuous_timesteps = scheduler_config.get("timestep_type") == "continuous"
        channels = unet.config.in_channels
        self.learned_variance = unet.config.out_channels == 2 * channels  # iDDPM: [eps, variance]
        if family == "vp":
            self.schedule_log_snr = log_snr_of_schedule(alphas_cumprod).to(device)
            ends = time_of_log_snr(self.schedule_log_snr[[0, -1]])
            self.t_first, self.t_last = float(ends[0]), float(ends[1])

    @classmethod
    def from_spec(cls, spec: str, context: TeacherContext) -> Optional["DiffusersTeacher"]:
        parsed = split_spec(spec, cls.name, {})
        if parsed is None:
            return None
        folder = require_existing(spec, parsed[0], WHAT)
        unet_dir, scheduler_dir = locate_model(spec, folder)
        unet_config = _read_json(spec, unet_dir / "config.json")
        scheduler_config = _read_json(spec, scheduler_dir / "scheduler_config.json")
        check_unet_config(spec, unet_config)
        family = check_scheduler_config(spec, scheduler_config)
        out_channels = int(unet_config.get("out_channels", unet_config["in_channels"]))
        if out_channels not in (unet_config["in_channels"], 2 * unet_config["in_channels"]):
            raise distillkit.ConfigError("teacher", spec, f"a UNet with out_channels = in_channels (or twice, learned variance); got {out_channels}")
        check_data_shape(spec, _image_shape(unet_config), unet_config.get("num_class_embeds"), context.data)

        diffusers = require_diffusers_installed(spec)
        alphas_cumprod = None
        if family == "vp":
            scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
            alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        try:
            unet = diffusers.UNet2DModel.from_pretrained(
                unet_dir, local_files_only=True, low_cpu_mem_usage=False, torch_dtype=torch.float32
            )
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise distillkit.ConfigError("teacher", spec, f"{WHAT}; the UNet cannot be loaded ({first})") from None
        unet = unet.to(context.device).eval().requires_grad_(False)
        files = [unet_dir / "config.json", scheduler_dir / "scheduler_config.json"]
        files += [unet_dir / name for name in WEIGHT_FILES if (unet_dir / name).is_file()]
        identity = f"diffusers:{folder} sha256:{files_sha256(files)}"
        return cls(unet, scheduler_config, family, alphas_cumprod, identity, context.device)

    def _model(self, z: torch.Tensor, timestep: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = getattr(self.unet, "dtype", torch.float32)  # the model's own precision (float32 as loaded)
        out = self.unet(z.to(dtype), timestep.to(dtype), class_labels=cond).sample
        return out[:, : z.shape[1]] if self.learned_variance else out

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input the model gets at our (already clamped) time ``t`` (float64)."""
        if self.continuous_timesteps:
            return 0.25 * torch.log(t / (1 - t))
        return timestep_at_log_snr(log_snr_of_time(t), self.schedule_log_snr.to(t.device))

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
        if self.family == "flow":
            return self._model(x, self.num_train_timesteps * t, cond).to(x.dtype)
        t = t.clamp(self.t_first, self.t_last)
        alpha, sigma, norm = (distillkit.broadcast_time(c, x) for c in vp_coefficients(t))
        x64 = x.to(torch.float64)
        z = x64 / norm
        output = self._model(z, self.model_timestep(t), cond).to(torch.float64)
        v = vp_prediction_to_velocity(self.prediction_type, output, z, x64, distillkit.broadcast_time(t, x), alpha, sigma)
        return v.to(x.dtype)
