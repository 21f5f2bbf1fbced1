"""Bad input found by the adversarial pass (issue 14): each is one line on stderr, exit code 2,
no traceback, nothing written; unknown names and misspelled flags get a "did you mean"."""

import pytest

from distillkit.cli.main import main


def one_line_error(capsys, argv, tmp_path):
    runs = tmp_path / "runs"
    code = main([*argv, "--runs-dir", str(runs)] if argv[0] == "run" else argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("distillkit: error: "), captured.err
    assert not runs.exists()
    return lines[0]


def test_an_integrator_for_a_method_that_takes_none_points_to_the_sampler(capsys, tmp_path):
    line = one_line_error(capsys, ["run", "--method", "fm", "--integrator", "rk3", "--dry-run"], tmp_path)
    assert "--integrator='rk3'" in line and "method fm takes no integrator" in line
    assert "--sample-integrator rk3" in line and "--sampler ode" in line


def test_the_suggested_sample_integrator_is_accepted(capsys):
    assert main(["run", "--method", "fm", "--sampler", "ode", "--sample-integrator", "rk3", "--nfe", "3,6",
                 "--dry-run"]) == 0
    assert 'integrator = "rk3"' in capsys.readouterr().out


def test_a_toml_file_that_is_not_utf8(capsys, tmp_path):
    config = tmp_path / "latin1.toml"
    config.write_bytes('method = "fm"\n# réglages\n'.encode("latin-1"))
    line = one_line_error(capsys, ["run", "--config", str(config), "--dry-run"], tmp_path)
    assert "--config=" in line and "UTF-8" in line


@pytest.mark.parametrize("seed", ["18446744073709551617", "9223372036854775808"])
def test_a_seed_torch_cannot_take_is_refused_at_config_time(capsys, tmp_path, seed):
    line = one_line_error(capsys, ["run", "--seed", seed, "--dry-run"], tmp_path)
    assert f"--seed={seed}" in line and "an integer from 0 to 9223372036854775807" in line
    line = one_line_error(capsys, ["run", "--set", f"sample.seed={seed}", "--dry-run"], tmp_path)
    assert f"sample.seed={seed}" in line


def test_the_largest_seed_allowed_runs(capsys, tmp_path):
    """The bound is real: the largest accepted seed trains, samples and evaluates."""
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "1", "--batch-size", "8",
                 "--seed", str(2**63 - 1), "--set", f"sample.seed={2**63 - 1}", "--set", "sample.num_samples=8",
                 "--set", "sample.reference_steps=1", "--nfe", "1", "--no-track", "--quiet",
                 "--runs-dir", str(tmp_path)]) == 0


def test_sample_and_eval_seeds_have_the_same_bound():
    from distillkit.arguments import parse_seed
    from distillkit.errors import ConfigError

    assert parse_seed(str(2**63 - 1)) == 2**63 - 1
    with pytest.raises(ConfigError, match="an integer from 0 to"):
        parse_seed(str(2**64 + 1))


def test_an_image_backbone_on_2d_points_is_refused_when_resolved(capsys, tmp_path):
    line = one_line_error(capsys, ["run", "--dataset", "toy2d", "--backbone", "songunet", "--dry-run"], tmp_path)
    assert "--backbone='songunet'" in line and "takes vectors" in line and "dataset toy2d" in line
    assert "mlp" in line  # the backbone that fits


def test_a_vector_backbone_on_images_is_refused_when_resolved(capsys, tmp_path):
    line = one_line_error(capsys, ["run", "--dataset", "digits", "--backbone", "mlp", "--dry-run"], tmp_path)
    assert "--backbone='mlp'" in line and "takes images" in line and "unet" in line


SUGGESTIONS = [
    (["run", "--method", "fmm", "--dry-run"], "unknown method (did you mean 'fm'"),
    (["run", "--dataset", "toy2", "--dry-run"], "unknown dataset (did you mean 'toy2d'?)"),
    (["run", "--backbone", "songunt", "--dry-run"], "unknown backbone (did you mean 'songunet'?)"),
    (["run", "--sampler", "od", "--dry-run"], "unknown sampler (did you mean 'ode'?)"),
    (["run", "--set", "sample.grid=unifrm", "--dry-run"], "unknown grid (did you mean 'uniform'?)"),
    (["run", "--method", "cud", "--integrator", "rk33", "--dry-run"], "unknown integrator (did you mean 'rk3'"),
    (["run", "--set", "train.lrr=1", "--dry-run"], "unknown option (did you mean 'train.lr'"),
    (["run", "--set", "method_option.tn=1", "--dry-run"], "(did you mean 'method_options'"),
    (["run", "--metod", "fm"], "unrecognized arguments: --metod fm (did you mean '--method'?)"),
    (["run", "--max-stpes=3"], "(did you mean '--max-steps'?)"),
    (["rnu"], "invalid choice: 'rnu'"),
    (["eval", "--run", "x", "--metric", "enrgy"], "(did you mean 'energy'?)"),
]


@pytest.mark.parametrize("argv,hint", SUGGESTIONS, ids=[" ".join(a) for a, _ in SUGGESTIONS])
def test_unknown_names_and_flags_get_a_suggestion(capsys, tmp_path, argv, hint):
    line = one_line_error(capsys, argv, tmp_path)
    assert hint in line
    if argv == ["rnu"]:
        assert "(did you mean 'run'?)" in line


def test_no_suggestion_when_nothing_is_close(capsys, tmp_path):
    line = one_line_error(capsys, ["run", "--method", "zzzzzz", "--dry-run"], tmp_path)
    assert "did you mean" not in line


def test_unknown_teacher_name_gets_a_suggestion():
    from distillkit.contracts import DataSpec, TeacherContext
    from distillkit.errors import ConfigError
    from distillkit.plugin_manager import get_registries
    from distillkit.teachers import load_teacher

    context = TeacherContext(data=DataSpec((2,)), dataset_name="toy2d", dataset_config=None, device="cpu",
                             runs_dir="/nonexistent", tracking_uri="")
    with pytest.raises(ConfigError, match=r"did you mean 'toy2d-exact'\?"):
        load_teacher("toy2d-exat", get_registries(), context)


def test_unknown_name_error_from_a_registry_suggests():
    from distillkit.errors import UnknownNameError
    from distillkit.plugin_manager import get_registries

    with pytest.raises(UnknownNameError, match=r"unknown integrator 'huen' \(did you mean 'heun'\?\)"):
        get_registries().integrators.get("huen")
