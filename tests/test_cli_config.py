"""Configuration and the command line: one source of options, one-line errors with exit code 2."""

import tomllib

import pytest

from distillkit.cli.main import main
from distillkit.config import RunConfig, run_config_from_dict


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run(capsys, *argv):
    code, out, err = run_cli(capsys, "run", *argv, "--dry-run")
    assert code == 0, err
    return tomllib.loads(out)


def test_dry_run_prints_resolved_config_with_plugin_defaults(capsys):
    resolved = dry_run(capsys, "--method", "cud", "--integrator", "rk3")
    assert resolved["method"] == "cud" and resolved["integrator"] == "rk3"
    assert resolved["backbone"] == "unet"  # "auto" resolved through the dataset
    assert resolved["method_options"]["tn"] == 16
    assert resolved["train"]["max_steps"] == RunConfig().train.max_steps
    assert resolved["sample"]["nfe"] == [1, 2, 4, 8]


def test_config_file_then_flags_then_set(capsys, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "fm"\ndataset = "toy2d"\n[train]\nlr = 0.01\nbatch_size = 32\n[method_options]\nt_min = 0.001\n')
    resolved = dry_run(capsys, "--config", str(config), "--batch-size", "64", "--set", "train.lr=0.5", "--nfe", "2,4")
    assert resolved["method"] == "fm" and resolved["backbone"] == "mlp"
    assert resolved["train"]["batch_size"] == 64 and resolved["train"]["lr"] == 0.5
    assert resolved["method_options"]["t_min"] == 0.001
    assert resolved["sample"]["nfe"] == [2, 4]


def test_dry_run_output_is_a_valid_config_file(capsys, tmp_path):
    first = dry_run(capsys, "--method", "cud", "--set", "method_options.tn=8")
    path = tmp_path / "again.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(first))
    assert dry_run(capsys, "--config", str(path)) == first


BAD_INPUTS = [
    (["--method", "nope"], "--method='nope' is not allowed: unknown method; available: "),
    (["--integrator", "rk9"], "--integrator='rk9' is not allowed: unknown integrator (did you mean 'rk4' or 'rk3'?); available:"),
    (["--dataset", "imagenet"], "--dataset='imagenet' is not allowed: unknown dataset (did you mean 'imagenet64'?); available: "),
    (["--backbone", "resnet"], "--backbone='resnet' is not allowed: unknown backbone (did you mean 'unet'?); available: "),
    (["--max-steps", "0"], "--max-steps=0 (config key train.max_steps) is not allowed: a positive integer"),
    (["--max-steps", "-3"], "--max-steps=-3 (config key train.max_steps) is not allowed: a positive integer"),
    (["--max-steps", "ten"], "--max-steps='ten' (config key train.max_steps) is not allowed: an integer"),
    (["--batch-size", "0"], "--batch-size=0 (config key train.batch_size) is not allowed: a positive integer"),
    (["--nfe", "1,0"], "--nfe='1,0' (config key sample.nfe) is not allowed: one or more positive integers"),
    (["--set", "train.lr"], "--set='train.lr' is not allowed: KEY=VALUE"),
    (["--set", "train.bogus=1"], "train.bogus=1 is not allowed: unknown option; allowed: train.max_steps"),
    (["--set", "method_options.nope=1"], "method_options.nope=1 is not allowed: unknown option; allowed: method_options.tn"),
    (["--set", "method_options.tn=0"], "method_options.tn=0 is not allowed: a positive integer"),
    (["--set", "sample.integrator=heun"], "--nfe=1 (config key sample.nfe) is not allowed: heun spends 2 evaluations per step"),
    (["--device", "tpu"], "--device='tpu' is not allowed: cpu, cuda, cuda:N, mps or auto"),
    (["--config", "/nonexistent.toml"], "--config='/nonexistent.toml' is not allowed: an existing TOML file"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, message):
    runs = tmp_path / "runs"
    code, out, err = run_cli(capsys, "run", "--runs-dir", str(runs), *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distillkit: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert not runs.exists()


def test_bad_config_file_keys_and_types(capsys, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nmax_steps = 'many'\n")
    code, _, err = run_cli(capsys, "run", "--config", str(config))
    assert code == 2 and "--max-steps='many' (config key train.max_steps) is not allowed: an integer" in err
    config.write_text("colour = 'blue'\n")
    code, _, err = run_cli(capsys, "run", "--config", str(config))
    assert code == 2 and "colour='blue' is not allowed: unknown option" in err
    config.write_text("not toml [")
    code, _, err = run_cli(capsys, "run", "--config", str(config))
    assert code == 2 and "a readable TOML file" in err


def test_unwritable_runs_dir_fails_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "run", "--runs-dir", str(blocker / "runs"), "--max-steps", "1", "--no-track")
    assert code == 2 and "is not writable" in err and len(err.strip().splitlines()) == 1


def test_types_are_checked_not_cast():
    from distillkit.errors import ConfigError

    with pytest.raises(ConfigError, match="train.max_steps=2.5 is not allowed: an integer"):
        run_config_from_dict({"train": {"max_steps": 2.5}})
    with pytest.raises(ConfigError, match="seed=True is not allowed: an integer"):
        run_config_from_dict({"seed": True})
