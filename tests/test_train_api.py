"""``distillkit.train``: the quickstart's snippet runs as written; the config forms (RunConfig,
nested dict, dotted keys, TOML file) are the same run; bad options raise the one-line
ConfigError; ``--export`` through ``train(export=...)``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import distillkit
from distillkit.config import run_config_from_dict
from distillkit.training.api import config_tree

QUICKSTART = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"


def _snippet() -> str:
    """The fenced python block of the quickstart's "From Python" section."""
    text = QUICKSTART.read_text()
    section = text[text.index("## From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_quickstart_snippet_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet(), str(QUICKSTART), "exec"), namespace)
    run, samples = namespace["run"], namespace["samples"]
    assert run.id is None  # track=False
    assert run.checkpoint.is_file() and run.checkpoint.parent.parent == tmp_path / "distillkit-runs" / "runs"
    assert set(run.metrics) == {"eval/energy/nfe1", "eval/energy/nfe2", "eval/ode_error/nfe1", "eval/ode_error/nfe2"}
    assert all(np.isfinite(v) for v in run.metrics.values())
    # the metrics are the table's values, as printed
    for line in run.table.splitlines()[1:]:
        nfe, _, energy, ode_error = line.split()[:4]
        assert float(energy) == pytest.approx(run.metrics[f"eval/energy/nfe{nfe}"], abs=5e-5)
        assert float(ode_error) == pytest.approx(run.metrics[f"eval/ode_error/nfe{nfe}"], abs=5e-5)
    assert samples.shape == (16, 2)
    # sample(...) is the run's generator: the Euler sampler at NFE 2, written out here from the
    # rebuilt velocity (x <- x - 0.5 v(x, 1), then x <- x - 0.5 v(x, 0.5)) on the documented noise
    trained = distillkit.load_trained_model(run.checkpoint)
    noise = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(i)) for i in range(16)])
    v = trained.velocity_fn()
    x = noise - 0.5 * v(noise, torch.ones(16))
    x = x - 0.5 * v(x, torch.full((16,), 0.5))
    torch.testing.assert_close(samples, x, rtol=0, atol=1e-5)
    assert str(run.checkpoint) in capsys.readouterr().out


def test_config_forms_are_the_same_run(tmp_path):
    nested = {"method": "fm", "dataset": "toy2d", "train": {"max_steps": 20, "lr": 1e-3}, "sample": {"nfe": [1, 2]}}
    dotted = {"method": "fm", "dataset": "toy2d", "train.max_steps": 20, "train.lr": 1e-3, "sample.nfe": [1, 2]}
    toml = tmp_path / "run.toml"
    toml.write_text('method = "fm"\ndataset = "toy2d"\n[train]\nmax_steps = 20\nlr = 1e-3\n[sample]\nnfe = [1, 2]\n')
    configs = [run_config_from_dict(config_tree(form)) for form in (nested, dotted, toml, str(toml))]
    configs.append(run_config_from_dict(config_tree(configs[0])))
    assert all(c == configs[0] for c in configs)
    assert configs[0].train.max_steps == 20 and configs[0].train.lr == 1e-3 and configs[0].sample.nfe == (1, 2)


@pytest.mark.parametrize("config, match", [
    ({"method": "fm", "dataset": "toy2d", "train.max_steps": 0}, r"train\.max_steps=0 is not allowed: a positive"),
    ({"method": "no-such-method"}, r"method='no-such-method' is not allowed"),
    ({"colour": "blue"}, r"colour='blue' is not allowed: unknown option"),
    ("missing.toml", r"--config='missing.toml' is not allowed: an existing TOML file"),
])
def test_bad_options_raise_the_one_line_config_error(config, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(distillkit.ConfigError) as raised:
        distillkit.train(config, track=False)
    assert len(str(raised.value).splitlines()) == 1 and re.search(match, str(raised.value)), str(raised.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_a_bad_export_format_is_refused_before_training(tmp_path):
    with pytest.raises(distillkit.ConfigError, match=r"export='onnx'.*torchscript, safetensors, mlflow"):
        distillkit.train({"method": "fm", "dataset": "toy2d", "runs_dir": str(tmp_path / "r")}, track=False,
                         export="onnx")
    assert not (tmp_path / "r").exists()


def test_train_exports_when_asked(tmp_path):
    """``export=`` is ``distillkit run --export``: the files land in the run folder and are the run's
    generator at the chosen NFE."""
    run = distillkit.train({"method": "fm", "dataset": "toy2d", "runs_dir": str(tmp_path),
                            "train": {"max_steps": 4, "batch_size": 32},
                            "sample": {"nfe": [1], "num_samples": 64, "reference_steps": 4}},
                           track=False, export="torchscript,safetensors", export_nfe=2)
    assert [e.format for e in run.exports] == ["torchscript", "safetensors"]
    assert [e.path.name for e in run.exports] == ["generator-nfe2.pt", "generator-nfe2.safetensors"]
    assert all(e.path.parent == run.output_dir / "export" for e in run.exports)
    module = torch.jit.load(str(run.exports[0].path))
    loaded = distillkit.load_generator(run.exports[1].path)
    noise, _, fresh = loaded.seeded_inputs(6, 4)
    expected = run.sample(6, nfe=2, seed=4)
    torch.testing.assert_close(module(noise, fresh=fresh), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.sample(6, 4), expected, rtol=0, atol=0)
