"""``diffusers:PATH`` teachers: tiny random diffusers models saved here, converted to our velocity.

Every expected value is computed in this file from the definitions (betas of each schedule, the
VP state z = alpha x + sigma eps, each prediction type) and compared with the teacher at
timesteps on the model's own grid, where the conversion is exact.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import distillkit
from distillkit import DataSpec
from distillkit.cli.main import main
from distillkit.testing.teachers import TeacherConformance

diffusers = pytest.importorskip("diffusers")

DIGITS = DataSpec((1, 8, 8))
GRID = [0, 1, 10, 100, 250, 500, 750, 900, 999]  # timesteps on the model's grid (T = 1000)


def tiny_unet(num_class_embeds=None, out_channels=1, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, num_class_embeds=num_class_embeds,
    ).eval()


def save_model(folder: Path, scheduler, num_class_embeds=None) -> tuple[Path, torch.nn.Module]:
    unet = tiny_unet(num_class_embeds)
    unet.save_pretrained(folder)
    scheduler.save_pretrained(folder)
    return folder, unet


# -- the conversion, written here from the definitions ---------------------------------------------


def betas(schedule: str, steps=1000, start=1e-4, end=0.02) -> torch.Tensor:
    """beta_0 .. beta_{T-1} of each schedule, in float32 as diffusers builds them (the model was
    trained on those float32 values; float64 ones differ by ~1e-6 relative near t = 1)."""
    if schedule == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)],
                            dtype=torch.float32)
    raise ValueError(schedule)


def alphas_cumprod(schedule: str, **kwargs) -> torch.Tensor:
    return torch.cumprod(1 - betas(schedule, **kwargs), 0).to(torch.float64)


def expected_velocity(unet, prediction, abar_n, n, x_t, cond=None):
    """Our velocity at the t whose SNR is step n's, from the model called at n on the VP state."""
    alpha, sigma = abar_n**0.5, (1 - abar_n) ** 0.5
    t = sigma / (alpha + sigma)  # sigma / alpha = t / (1 - t)
    z = alpha * x_t / (1 - t)  # = alpha x + sigma eps when x_t = (1 - t) x + t eps
    with torch.no_grad():  # the model in float32, as loaded; the conversion in float64
        out = unet(z.float(), torch.full((x_t.shape[0],), float(n)), class_labels=cond).sample.double()
    if prediction == "epsilon":
        eps = out
        x = (z - sigma * eps) / alpha
    elif prediction == "sample":
        x = out
        eps = (z - alpha * x) / sigma
    else:  # v_prediction: v = alpha eps - sigma x
        eps = sigma * z + alpha * out
        x = alpha * z - sigma * out
    return t, eps - x


def assert_on_grid(teacher, unet, prediction, abar, cond=None):
    generator = torch.Generator().manual_seed(1)
    for n in GRID:
        x_t = torch.randn(4, 1, 8, 8, generator=generator, dtype=torch.float64)
        t, expected = expected_velocity(unet, prediction, abar[n].item(), n, x_t, cond)
        got = teacher.velocity(x_t, torch.full((4,), t, dtype=torch.float64), cond)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"timestep {n}")


# -- VP schedulers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddpm_teacher_equals_the_conversion_on_the_grid(tmp_path, schedule, prediction):
    folder, unet = save_model(tmp_path, diffusers.DDPMScheduler(beta_schedule=schedule, prediction_type=prediction))
    teacher = distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)
    abar = alphas_cumprod(schedule)
    assert_on_grid(teacher, unet, prediction, abar)


@pytest.mark.parametrize("scheduler_class", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_ddim_and_euler_configs_read_the_same_schedule(tmp_path, scheduler_class):
    scheduler = getattr(diffusers, scheduler_class)(beta_schedule="scaled_linear", beta_start=0.00085,
                                                    beta_end=0.012, prediction_type="v_prediction")
    folder, unet = save_model(tmp_path, scheduler)
    teacher = distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)
    abar = alphas_cumprod("scaled_linear", start=0.00085, end=0.012)
    assert_on_grid(teacher, unet, "v_prediction", abar)


def test_class_conditional_pipeline_folder(tmp_path):
    unet = tiny_unet(num_class_embeds=10)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "unet").is_dir()
    teacher = distillkit.load_teacher(f"diffusers:{tmp_path}", data=DataSpec((1, 8, 8), 10))
    abar = alphas_cumprod("linear")
    assert_on_grid(teacher, unet, "epsilon", abar, cond=torch.tensor([0, 3, 7, 9]))


def test_between_grid_points_the_timestep_is_linear_in_log_snr(tmp_path):
    folder, unet = save_model(tmp_path, diffusers.DDPMScheduler(prediction_type="v_prediction"))
    teacher = distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)
    abar = alphas_cumprod("linear")
    lam = torch.log(abar / (1 - abar))
    n, w = 400, 0.3
    lam_star = (1 - w) * lam[n] + w * lam[n + 1]
    t = 1 / (1 + torch.exp(lam_star / 2))  # lambda = 2 log((1 - t) / t)
    alpha, sigma = (1 - t) / ((1 - t) ** 2 + t**2) ** 0.5, t / ((1 - t) ** 2 + t**2) ** 0.5
    x_t = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    z = alpha * x_t / (1 - t)
    with torch.no_grad():
        out = unet(z.float(), torch.full((3,), n + w), class_labels=None).sample.double()
    expected = (sigma * z + alpha * out) - (alpha * z - sigma * out)
    torch.testing.assert_close(teacher.velocity(x_t, t.expand(3)), expected, rtol=1e-5, atol=1e-5)


def test_times_beyond_the_grid_take_the_velocity_at_its_ends(tmp_path):
    folder, _ = save_model(tmp_path, diffusers.DDPMScheduler())
    teacher = distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)
    abar = alphas_cumprod("linear")
    first = ((1 - abar[0]) ** 0.5 / (abar[0] ** 0.5 + (1 - abar[0]) ** 0.5)).item()
    last = ((1 - abar[-1]) ** 0.5 / (abar[-1] ** 0.5 + (1 - abar[-1]) ** 0.5)).item()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(teacher.velocity(x, 0.0), teacher.velocity(x, first), rtol=0, atol=0)
    torch.testing.assert_close(teacher.velocity(x, 1.0), teacher.velocity(x, last), rtol=0, atol=0)
    assert torch.isfinite(teacher.velocity(x, 1.0)).all()


# -- flow matching --------------------------------------------------------------------------------------


def test_flow_matching_with_shift_is_the_model_at_sigma_and_steps_like_the_scheduler(tmp_path):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    folder, unet = save_model(tmp_path, scheduler)
    teacher = distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)
    # on the model's (shifted) training grid: timestep = 1000 sigma, output = eps - x
    sigmas = scheduler.sigmas[[0, 100, 500, 900, 999]].double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = unet(x.float(), (sigmas * 1000).float()).sample.double()
    torch.testing.assert_close(teacher.velocity(x, sigmas), expected, rtol=1e-5, atol=1e-5)
    # the scheduler's own Euler steps (shifted schedule) are Euler steps of our velocity
    scheduler.set_timesteps(4)
    x = torch.randn(2, 1, 8, 8)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma, sigma_next = scheduler.sigmas[i].item(), scheduler.sigmas[i + 1].item()
        v = teacher.velocity(x, sigma)
        with torch.no_grad():
            out = unet(x, timestep.expand(2)).sample
        reference = scheduler.step(out, timestep, x).prev_sample
        ours = x + (sigma_next - sigma) * v
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        x = reference


# -- closed form: a VP epsilon-model of a Gaussian mixture is toy2d-exact ----------------------------------


class MixtureEpsilonModel(torch.nn.Module):
    """The exact E[eps | z] of a VP model of an isotropic Gaussian mixture, at integer timesteps
    of a linear schedule: z | k ~ N(alpha mu_k, (alpha^2 s^2 + sigma^2) I)."""

    def __init__(self, abar, means, std):
        super().__init__()
        self.abar, self.means, self.std = abar, means, std
        self.config = type("Config", (), {"in_channels": 2, "out_channels": 2})()
        self.dtype = torch.float64

    def forward(self, z, timestep, class_labels=None):
        n = timestep.round()
        assert (timestep - n).abs().max() < 1e-6, "the closed-form model is only defined on the grid"
        abar = self.abar[n.long()][:, None]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        variance = alpha**2 * self.std**2 + sigma**2  # [B, 1]
        centred = z[:, None, :] - alpha[:, :, None] * self.means[None]  # [B, K, D]
        log_weight = -0.5 * centred.square().sum(-1) / variance - torch.log(variance)  # D = 2: -(D/2) log var
        weight = torch.softmax(log_weight, dim=1)
        eps = (weight[:, :, None] * sigma[:, :, None] / variance[:, :, None] * centred).sum(1)
        return type("Output", (), {"sample": eps})()


def test_vp_epsilon_model_of_the_toy_mixture_converts_to_toy2d_exact(registries):
    from distillkit_teachers.diffusers_teacher import DiffusersTeacher

    abar = alphas_cumprod("linear")
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)  # toy2d: 8 components, radius 2
    model = MixtureEpsilonModel(abar, means, 0.15)
    teacher = DiffusersTeacher(model, {"prediction_type": "epsilon"}, "vp", abar, "closed-form", "cpu")
    exact = registries.teachers.get("toy2d-exact")()
    generator = torch.Generator().manual_seed(0)
    for n in [0, 5, 50, 200, 500, 800, 950]:
        alpha, sigma = abar[n].sqrt(), (1 - abar[n]).sqrt()
        t = (sigma / (alpha + sigma)).item()
        x = 3 * torch.randn(64, 2, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(teacher.velocity(x, t), exact.velocity(x, torch.full((64,), t, dtype=torch.float64)),
                                   rtol=1e-5, atol=1e-5, msg=f"timestep {n}")


# -- refusals -------------------------------------------------------------------------------------------


def test_refusals_are_one_line_config_errors(tmp_path):
    folder, _ = save_model(tmp_path / "m", diffusers.DDPMScheduler())
    with pytest.raises(distillkit.ConfigError, match="does not exist"):
        distillkit.load_teacher(f"diffusers:{tmp_path / 'nowhere'}", data=DIGITS)
    with pytest.raises(distillkit.ConfigError, match=r"data shaped like the student's \(1, 16, 16\)"):
        distillkit.load_teacher(f"diffusers:{folder}", data=DataSpec((1, 16, 16)))
    with pytest.raises(distillkit.ConfigError, match="student data's labels"):
        distillkit.load_teacher(f"diffusers:{folder}", data=DataSpec((1, 8, 8), 10))
    config = json.loads((folder / "scheduler_config.json").read_text())
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "ScoreSdeVeScheduler"}))
    with pytest.raises(distillkit.ConfigError, match="a scheduler among DDPMScheduler"):
        distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)


def test_missing_diffusers_names_the_extra(tmp_path, monkeypatch):
    folder, _ = save_model(tmp_path, diffusers.DDPMScheduler())
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    with pytest.raises(distillkit.UsageError, match=r"pip install distillkit\[diffusers\]"):
        distillkit.load_teacher(f"diffusers:{folder}", data=DIGITS)


# -- the whole path: distil a tiny DDPM from the command line ------------------------------------------------


def test_cd_distils_a_diffusers_ddpm_on_digits_and_evaluates_it(tmp_path, capsys, caplog):
    folder, _ = save_model(tmp_path / "ddpm", diffusers.DDPMScheduler())
    assert main(["run", "--method", "cd", "--teacher", f"diffusers:{folder}", "--dataset", "digits",
                 "--max-steps", "3", "--batch-size", "8", "--runs-dir", str(tmp_path / "runs"), "--no-track",
                 "--set", "sample.num_samples=32", "--set", "sample.reference_steps=2", "--nfe", "1"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^\s+1\s+1\s+\d+\.\d+\s+\d+\.\d+", captured.out, re.M), captured.out  # the NFE-1 row
    # init_from_teacher is on by default; no backbone holds a UNet2DModel, which is said in one line
    advice = [r.getMessage() for r in caplog.records if r.name == "distillkit.init"]
    assert len(advice) == 1 and "no distillkit backbone of the same architecture" in advice[0], advice


def test_cli_refuses_a_bad_diffusers_folder_with_one_line(tmp_path, capsys):
    code = main(["run", "--method", "cd", "--teacher", f"diffusers:{tmp_path}", "--dataset", "digits",
                 "--max-steps", "1", "--runs-dir", str(tmp_path / "runs"), "--no-track"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "config.json" in err, err
    assert not (tmp_path / "runs").exists()


# -- conformance ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("ddpm"), diffusers.DDPMScheduler(prediction_type="epsilon"))[0]


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("flow"), diffusers.FlowMatchEulerDiscreteScheduler(shift=2.0))[0]


@pytest.fixture(scope="module")
def conditional_folder(tmp_path_factory):
    scheduler = diffusers.DDPMScheduler(prediction_type="sample", beta_schedule="squaredcos_cap_v2")
    return save_model(tmp_path_factory.mktemp("cond"), scheduler, num_class_embeds=10)[0]


class TestDiffusersVPTeacher(TeacherConformance):
    dataset, dataset_options = "digits", {}

    @pytest.fixture
    def teacher_spec(self, ddpm_folder):
        return f"diffusers:{ddpm_folder}"


class TestDiffusersFlowTeacher(TeacherConformance):
    dataset, dataset_options = "digits", {}

    @pytest.fixture
    def teacher_spec(self, flow_folder):
        return f"diffusers:{flow_folder}"


class TestDiffusersConditionalTeacher(TeacherConformance):
    dataset, dataset_options = "digits", {"class_conditional": True}

    @pytest.fixture
    def teacher_spec(self, conditional_folder):
        return f"diffusers:{conditional_folder}"


def test_loading_the_plugins_does_not_import_diffusers():
    import subprocess

    code = "import sys, distillkit; distillkit.get_registries(); print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
