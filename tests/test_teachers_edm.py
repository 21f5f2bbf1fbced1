"""``edm:FILE`` teachers: EDM SongUNet / DhariwalUNet state dicts in the songunet / adm backbones.

EDM's parameter names for two tiny configurations are written out by hand below, from the naming
rules of EDM's ``training/networks.py`` (read, not copied); the preconditioning formulas are
written here from the EDM paper's table 1.
"""

import logging
import math
import pickle

import pytest
import torch

save_file = pytest.importorskip("safetensors.torch").save_file

import distillkit
from distillkit import DataSpec
from distillkit.cli.main import main
from distillkit.testing.teachers import TeacherConformance

SONG = {"preset": "mnist", "channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (4,), "dropout": 0.0}
ADM = {"channels": 32, "channel_mult": (1, 2), "num_res_blocks": 1, "attention_resolutions": (), "num_head_channels": 64,
       "dropout": 0.0, "num_groups": 8}


def build(registries, name, options, classes=None, seed=0):
    torch.manual_seed(seed)
    cls = registries.backbones.get(name)
    network = cls(cls.config_class(**options), DataSpec((1, 8, 8), classes)).eval()
    with torch.no_grad():  # near-zero output layers would make every comparison trivially pass
        for parameter in network.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return network


def unet_block(name, skip=False, attention=False, adaptive=False):
    """EDM's UNetBlock parameter names (norm0, conv0, affine, norm1, conv1 [, skip] [, norm2, qkv, proj])."""
    layers = ["norm0", "conv0", "affine", "norm1", "conv1"] + (["skip"] if skip else [])
    layers += ["norm2", "qkv", "proj"] if attention else []
    return {f"{name}.{layer}.{p}" for layer in layers for p in ("weight", "bias")}


def edm_songunet_names():
    """SongUNet(img_resolution=8, in_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[4]), by hand."""
    names = {"map_label.weight", "map_label.bias", "map_layer0.weight", "map_layer0.bias",
             "map_layer1.weight", "map_layer1.bias", "enc.8x8_conv.weight", "enc.8x8_conv.bias",
             "dec.8x8_aux_norm.weight", "dec.8x8_aux_norm.bias", "dec.8x8_aux_conv.weight", "dec.8x8_aux_conv.bias"}
    names |= unet_block("enc.8x8_block0")
    names |= unet_block("enc.4x4_down", skip=True)  # resample_proj: resampling blocks project their skip
    names |= unet_block("enc.4x4_block0", skip=True, attention=True)
    names |= unet_block("dec.4x4_in0", attention=True) | unet_block("dec.4x4_in1")
    names |= unet_block("dec.4x4_block0", skip=True) | unet_block("dec.4x4_block1", skip=True, attention=True)
    names |= unet_block("dec.8x8_up", skip=True)
    names |= unet_block("dec.8x8_block0", skip=True) | unet_block("dec.8x8_block1", skip=True)
    return names


def edm_dhariwal_names():
    """DhariwalUNet(img_resolution=8, in_channels=1, label_dim=10, model_channels=32, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[]), by hand: 64 channels per head, so only the middle attends."""
    names = {"map_label.weight", "map_layer0.weight", "map_layer0.bias", "map_layer1.weight", "map_layer1.bias",
             "enc.8x8_conv.weight", "enc.8x8_conv.bias", "out_norm.weight", "out_norm.bias",
             "out_conv.weight", "out_conv.bias"}
    names |= unet_block("enc.8x8_block0") | unet_block("enc.4x4_down")  # same width: a parameter-free skip
    names |= unet_block("enc.4x4_block0", skip=True)
    names |= unet_block("dec.4x4_in0", attention=True) | unet_block("dec.4x4_in1")
    names |= unet_block("dec.4x4_block0", skip=True) | unet_block("dec.4x4_block1", skip=True)
    names |= unet_block("dec.8x8_up")
    names |= unet_block("dec.8x8_block0", skip=True) | unet_block("dec.8x8_block1", skip=True)
    return names


def edm_file(path, network, *, resample_blocks=(), prefix="model."):
    """Write ``network`` as EDM would save it: ``model.``-prefixed keys, the resample_filter buffers
    of its resampling blocks, and a (bias-free) augmentation layer."""
    state = network.to_edm_state_dict()
    box = torch.full((1, 1, 2, 2), 0.25)
    for block in resample_blocks:
        state[f"{block}.conv0.resample_filter"] = box.clone()
        state[f"{block}.skip.resample_filter"] = box.clone()
    state["map_augment.weight"] = torch.randn(state["map_layer0.weight"].shape[1], 9)
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# -- the name map ----------------------------------------------------------------------------------------


def test_songunet_parameters_are_edms_songunet_parameters(registries):
    network = build(registries, "songunet", SONG, classes=10)
    state = network.to_edm_state_dict()
    assert set(state) == edm_songunet_names()
    assert len(state) == len(network.state_dict()) + 1  # one to one, plus map_label's bias
    assert state["enc.4x4_block0.qkv.weight"].shape == (96, 32, 1, 1)
    assert state["map_label.weight"].shape == (16, 10)  # Linear(label_dim -> noise channels)
    assert state["dec.4x4_block1.conv0.weight"].shape == (32, 48, 3, 3)


def test_adm_parameters_are_edms_dhariwalunet_parameters(registries):
    network = build(registries, "adm", ADM, classes=10)
    state = network.to_edm_state_dict()
    assert set(state) == edm_dhariwal_names()
    assert len(state) == len(network.state_dict())
    assert state["dec.4x4_in0.qkv.weight"].shape == (192, 64, 1, 1)
    assert state["enc.4x4_block0.affine.weight"].shape == (128, 128)  # scale and shift
    assert state["map_label.weight"].shape == (128, 10)


def edm_attention(x, qkv_weight, qkv_bias, heads):
    """EDM's attention read from its qkv layout ([head, channel, (q, k, v)]), written here."""
    batch, channels, height, width = x.shape
    qkv = torch.nn.functional.conv2d(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(batch * heads, channels // heads, 3, height * width).unbind(2)
    weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(channels // heads)).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", weights, v).reshape(batch, channels, height, width)


@pytest.mark.parametrize("name", ["songunet", "adm"])
def test_attention_weights_keep_edms_meaning(registries, name):
    network = build(registries, name, SONG if name == "songunet" else ADM)
    edm = network.to_edm_state_dict()
    prefix, block = ("enc.4x4_block0", network.encoder[3]) if name == "songunet" else ("dec.4x4_in0", network.middle[1])
    x = torch.randn(2, 32 if name == "songunet" else 64, 4, 4)
    a = edm_attention(x, edm[f"{prefix}.qkv.weight"], edm[f"{prefix}.qkv.bias"], heads=1)
    expected = torch.nn.functional.conv2d(a, edm[f"{prefix}.proj.weight"], edm[f"{prefix}.proj.bias"]) + x
    with torch.no_grad():
        if name == "songunet":  # the block's attention half, on its output x: (x + proj(attn)) / sqrt(2)
            q, k, v = block.qkv(x).reshape(2, 3, 32, 16).unbind(1)
            from distillkit_backbones.layers import multi_head_attention
            got = x + block.proj(multi_head_attention(q, k, v, 1).reshape(2, 32, 4, 4))
        else:  # qkv and proj only: bypass the group norm on both sides
            flat = x.reshape(2, 64, 16)
            q, k, v = block.qkv(flat).reshape(2, 1, 3, 64, 16).unbind(2)
            from distillkit_backbones.layers import multi_head_attention
            got = (flat + block.proj(multi_head_attention(q.reshape(2, 64, 16), k.reshape(2, 64, 16),
                                                          v.reshape(2, 64, 16), 1))).reshape(2, 64, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["songunet", "adm"])
def test_an_edm_file_loads_back_into_the_same_function(registries, tmp_path, name):
    network = build(registries, name, SONG if name == "songunet" else ADM, classes=10)
    path = edm_file(tmp_path / "net.safetensors", network, resample_blocks=("enc.4x4_down", "dec.8x8_up"))
    teacher = distillkit.load_teacher(f"edm:{path}", data=DataSpec((1, 8, 8), 10))
    assert teacher.network.name == name
    if name == "adm":  # EDM's group count, min(32, C / 4), is what the loaded network uses
        for module in network.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.num_groups = module.num_channels // 4
    x, t, cond = torch.randn(3, 1, 8, 8), torch.randn(3), torch.tensor([1, 5, 9])
    with torch.no_grad():
        torch.testing.assert_close(teacher.network(x, t, cond), network(x, t, cond), rtol=1e-5, atol=1e-6)


# -- preconditioning ----------------------------------------------------------------------------------------


def denoiser(network, precond, y, sigma):
    """D(y; sigma) = c_skip y + c_out F(c_in y, c_noise), EDM paper table 1 (sigma_data 0.5, VP 19.9 / 0.1 / 1000)."""
    s = sigma.reshape(-1, 1, 1, 1)
    if precond == "edm":
        c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25) ** 0.5, 1 / (s**2 + 0.25) ** 0.5
        c_noise = sigma.log() / 4
    elif precond == "vp":
        c_skip, c_out, c_in = 1.0, -s, 1 / (s**2 + 1) ** 0.5
        c_noise = 999 * ((0.1**2 + 2 * 19.9 * (1 + sigma**2).log()).sqrt() - 0.1) / 19.9
    else:
        c_skip, c_out, c_in, c_noise = 1.0, s, 1.0, (0.5 * sigma).log()
    with torch.no_grad():
        return c_skip * y + c_out * network((c_in * y).float(), c_noise.float()).double()


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_velocity_is_the_preconditioned_denoiser_in_our_time(registries, tmp_path, precond):
    network = build(registries, "songunet", SONG)
    path = edm_file(tmp_path / "net.safetensors", network)
    teacher = distillkit.load_teacher(f"edm:{path},precond={precond}", data=DataSpec((1, 8, 8)))
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    sigma = t / (1 - t)  # y = x + sigma eps = x_t / (1 - t)
    expected = (x_t - denoiser(network, precond, x_t / (1 - t).reshape(-1, 1, 1, 1), sigma)) / t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(teacher.velocity(x_t, t), expected, rtol=1e-5, atol=1e-5)
    # beyond the trained noise levels: the velocity at the nearest end (EDM: sigma in [0.002, 80])
    if precond == "edm":
        torch.testing.assert_close(teacher.velocity(x_t, 1.0), teacher.velocity(x_t, 80 / 81), rtol=0, atol=0)
        torch.testing.assert_close(teacher.velocity(x_t, 0.0), teacher.velocity(x_t, 0.002 / 1.002), rtol=0, atol=0)


# -- refusals ---------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_an_edm_pickle_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pickle-ran"
    snapshot = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    snapshot.write_bytes(pickle.dumps({"ema": _Trap(marker)}))
    with pytest.raises(distillkit.ConfigError, match=r"never loaded.*state_dict\(\).*save_file"):
        distillkit.load_teacher(f"edm:{snapshot}", data=DataSpec((1, 8, 8)))
    code = main(["run", "--method", "cd", "--teacher", f"edm:{snapshot}", "--dataset", "digits",
                 "--max-steps", "1", "--runs-dir", str(tmp_path / "runs"), "--no-track"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "docs/teachers.md" in err, err
    # a torch file holding code instead of tensors: weights_only refuses it too
    disguised = tmp_path / "net.pt"
    torch.save({"ema": _Trap(marker)}, disguised)
    with pytest.raises(distillkit.ConfigError, match="cannot be read"):
        distillkit.load_teacher(f"edm:{disguised}", data=DataSpec((1, 8, 8)))
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_ncsnpp_and_mismatched_data_are_refused(registries, tmp_path):
    network = build(registries, "songunet", SONG)
    state = {k: v.contiguous() for k, v in network.to_edm_state_dict().items()}
    save_file({**state, "map_noise.freqs": torch.randn(8)}, str(tmp_path / "ncsnpp.safetensors"))
    with pytest.raises(distillkit.ConfigError, match="NCSN\\+\\+"):
        distillkit.load_teacher(f"edm:{tmp_path / 'ncsnpp.safetensors'}", data=DataSpec((1, 8, 8)))
    path = edm_file(tmp_path / "net.safetensors", network)
    with pytest.raises(distillkit.ConfigError, match="data shaped like the student's"):
        distillkit.load_teacher(f"edm:{path}", data=DataSpec((3, 8, 8)))
    with pytest.raises(distillkit.ConfigError, match="precond=edm\\|vp\\|ve"):
        distillkit.load_teacher(f"edm:{path},precond=flow", data=DataSpec((1, 8, 8)))
    with pytest.raises(distillkit.ConfigError, match="options precond="):
        distillkit.load_teacher(f"edm:{path},sigma=3", data=DataSpec((1, 8, 8)))


# -- a student initialised from the EDM teacher ---------------------------------------------------------------


def test_student_of_the_teachers_architecture_starts_from_its_weights(registries, tmp_path, caplog):
    network = build(registries, "songunet", SONG)
    teacher = distillkit.load_teacher(f"edm:{edm_file(tmp_path / 'n.safetensors', network)}", data=DataSpec((1, 8, 8)))
    name, options = teacher.student_backbone
    matching = build(registries, name, options, seed=1)
    assert distillkit.copy_teacher_weights(matching, teacher) == "teacher"
    for key, value in network.state_dict().items():
        torch.testing.assert_close(matching.state_dict()[key], value)
    other = build(registries, "songunet", {**SONG, "channels": 8}, seed=1)
    with caplog.at_level(logging.WARNING, logger="distillkit.init"):
        assert distillkit.copy_teacher_weights(other, teacher) == "random"
    advice = [r.getMessage() for r in caplog.records if r.name == "distillkit.init"]
    assert len(advice) == 1 and "pass --backbone songunet --set backbone_options.preset=cifar10" in advice[0], advice
    assert "backbone_options.channels=16 " in advice[0] and "backbone_options.channel_mult=[1,2] " in advice[0]


# -- conformance ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edm_spec(tmp_path_factory):
    from distillkit.plugin_manager import get_registries

    network = build(get_registries(), "songunet", SONG)
    return f"edm:{edm_file(tmp_path_factory.mktemp('edm') / 'net.safetensors', network)},precond=vp"


class TestEdmTeacher(TeacherConformance):
    dataset, dataset_options = "digits", {}

    @pytest.fixture
    def teacher_spec(self, edm_spec):
        return edm_spec


def test_cd_distils_an_edm_teacher_into_a_student_started_from_it(registries, tmp_path, capsys, caplog):
    network = build(registries, "songunet", SONG)
    teacher_spec = f"edm:{edm_file(tmp_path / 'n.safetensors', network)},precond=vp"
    teacher = distillkit.load_teacher(teacher_spec, data=DataSpec((1, 8, 8)))
    name, options = teacher.student_backbone
    flags = [f for k, v in options.items()
             for f in ("--set", f"backbone_options.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", ""))]
    assert main(["run", "--method", "cd", "--teacher", teacher_spec, "--dataset", "digits", "--backbone", name, *flags,
                 "--max-steps", "2", "--batch-size", "8", "--runs-dir", str(tmp_path / "runs"), "--quiet",
                 "--set", "sample.num_samples=16", "--set", "sample.reference_steps=1", "--nfe", "1"]) == 0
    assert not [r for r in caplog.records if r.name == "distillkit.init"]  # the weights fitted: no advice
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("distillkit").experiment_id])[0]
    assert run.data.tags["distillkit.cd.init"] == "teacher"
    assert run.data.tags["distillkit.teacher"].startswith(f"edm:{tmp_path / 'n.safetensors'} precond=vp")


# -- closed form: EDM-preconditioned networks of the exact toy2d denoiser are toy2d-exact ------------------------


class MixtureDenoiserNetwork(torch.nn.Module):
    """F such that c_skip y + c_out F(c_in y, c_noise) is the exact E[x | y = x + sigma eps] of
    the toy2d mixture (8 components on a circle of radius 2, std 0.15), for one preconditioning."""

    name = "closed-form"
    backbone_options: dict = {}

    def __init__(self, precond):
        super().__init__()
        self.precond = precond
        angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        self.means = 2.0 * torch.stack([angles.cos(), angles.sin()], dim=1)

    def sigma_and_coefficients(self, c_noise):
        if self.precond == "edm":
            sigma = torch.exp(4 * c_noise)
            total = sigma**2 + 0.25
            return sigma, 0.25 / total, sigma * 0.5 / total.sqrt(), 1 / total.sqrt()
        if self.precond == "vp":
            s = c_noise / 999
            sigma = torch.sqrt(torch.exp(0.5 * 19.9 * s**2 + 0.1 * s) - 1)
            return sigma, torch.ones_like(sigma), -sigma, 1 / torch.sqrt(sigma**2 + 1)
        sigma = 2 * torch.exp(c_noise)
        return sigma, torch.ones_like(sigma), sigma, torch.ones_like(sigma)

    def forward(self, scaled, c_noise, cond=None):
        sigma, c_skip, c_out, c_in = (v[:, None] for v in self.sigma_and_coefficients(c_noise.double()))
        y = scaled.double() / c_in
        # y | k ~ N(mu_k, (s^2 + sigma^2) I):  E[x | y, k] = mu_k + s^2 / (s^2 + sigma^2) (y - mu_k)
        variance = 0.15**2 + sigma**2  # [B, 1]
        centred = y[:, None, :] - self.means[None]  # [B, K, 2]
        weight = torch.softmax(-0.5 * centred.square().sum(-1) / variance - torch.log(variance), dim=1)
        x_hat = (weight[:, :, None] * (self.means[None] + (0.15**2 / variance)[:, :, None] * centred)).sum(1)
        return (x_hat - c_skip * y) / c_out


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_preconditioned_exact_denoiser_converts_to_toy2d_exact(registries, precond):
    from distillkit_teachers.edm_teacher import EdmTeacher, Preconditioning

    teacher = EdmTeacher(MixtureDenoiserNetwork(precond), Preconditioning(f"edm:x,precond={precond}", {"precond": precond}),
                         "closed-form")
    exact = registries.teachers.get("toy2d-exact")()
    generator = torch.Generator().manual_seed(0)
    for t in [0.025, 0.1, 0.5, 0.9, 0.98]:  # inside every trained sigma range (VE: from 0.02)
        x = 3 * torch.randn(64, 2, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(teacher.velocity(x, t), exact.velocity(x, torch.full((64,), t, dtype=torch.float64)),
                                   rtol=1e-5, atol=1e-5, msg=f"t = {t}")
