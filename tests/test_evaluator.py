"""The one evaluator (distillkit.evaluation): everything that can fail is refused before the first
sample is drawn, the end-of-run evaluation is the same measurement as ``distillkit eval``, and
``eval`` / ``sample`` / ``compare`` sample with the sampler asked for and name it."""

from __future__ import annotations

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

import distillkit
from distillkit.cli.main import main
from distillkit.config import run_config_from_dict
from distillkit.errors import ConfigError, UsageError
from distillkit.evaluation import EvalSettings, Evaluator, end_of_run, of_network
from distillkit.resolve import resolve
from distillkit.training.build import build_model

TINY_EVAL = ["--set", "sample.num_samples=48", "--set", "sample.reference_steps=4"]


def _subject(dataset_name: str, spec, **sample):
    """An untrained fm network of ``dataset_name`` whose sampling-model calls are counted."""
    resolved = resolve(run_config_from_dict({"method": "fm", "dataset": dataset_name, "sample": sample}),
                       distillkit.get_registries())
    method, network = build_model(resolved, spec, torch.device("cpu"), seed=0)
    calls = []
    subject = of_network(method, network.eval(), resolved, spec=spec)
    counted = subject.model_for

    def model_for(cond):
        calls.append(cond)
        return counted(cond)

    import attrs

    return attrs.evolve(subject, model_for=model_for), calls


def _settings(metrics, nfes=(1, 2), **kw):
    return EvalSettings(metrics=tuple(metrics), nfes=tuple(nfes), n=16, seed=0, **kw)


@pytest.mark.parametrize("metrics, nfes, options, error, match", [
    (("energy", "fd_pixels"), (1,), {}, ConfigError, r"--metric='fd_pixels' is not allowed: a metric for this data "
                                                      r"\(fd_pixels measures images; toy2d samples have shape \(2,\)\)"),
    (("energy",), (2, 3), {"integrator": "heun"}, ConfigError, r"--nfe=3 is not allowed: heun spends 2 evaluations"),
    (("energy",), (1,), {"grid": "explicit", "grid_options": {"points": "1,0.5,0"}}, ConfigError,
     r"--nfe=1 is not allowed: explicit grid: .* has 2 steps"),
    (("energy",), (1,), {"sampler": "nope"}, ConfigError, r"--sampler='nope' is not allowed: unknown sampler"),
    (("sharpness",), (1,), {}, ConfigError, r"--metric='sharpness' is not allowed: unknown metric"),
    (("ode_error",), (1,), {"metric_options": {"ode_error": {"integrator": "rk9"}}}, ConfigError,
     r"metric_options.ode_error.integrator='rk9'"),
    (("ode_error",), (1,), {"teacher": "no-such-teacher"}, UsageError, r"no-such-teacher"),
])
def test_everything_is_checked_before_the_first_sample(metrics, nfes, options, error, match):
    subject, calls = _subject("toy2d", distillkit.DataSpec((2,)))
    with pytest.raises(error, match=match) as raised:
        Evaluator(subject, _settings(metrics, nfes, **options), log=None).run()
    assert "\n" not in str(raised.value)
    assert calls == []  # nothing was sampled


def test_missing_fid_statistics_are_refused_before_sampling(tmp_path, monkeypatch):
    from distillkit import fid
    from distillkit_metrics import Fid

    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path))
    subject, calls = _subject("digits", distillkit.DataSpec((1, 8, 8)))
    extractor = fid.FeatureExtractor(name="never-made", fn=lambda x: x.mean((2, 3)), input_size=None)
    with pytest.raises(UsageError, match=r"no FID reference statistics for dataset digits .*never-made"):
        Evaluator(subject, _settings(("fd_pixels", "fid")), metrics={"fid": Fid(extractor=extractor)}, log=None).run()
    assert calls == []


def test_end_of_run_is_evaluate_model_with_the_runs_own_sampler(tmp_path):
    """The trainer's evaluation and ``distillkit eval``'s defaults are one measurement: same
    numbers, same signatures, and the rows name the sampler."""
    from distillkit.evaluation import evaluate_model
    from distillkit.trained import TrainedModel

    tree = {"method": "fm", "dataset": "toy2d", "sample": {"num_samples": 40, "reference_steps": 4, "nfe": [1, 3]}}
    resolved = resolve(run_config_from_dict(tree), distillkit.get_registries())
    dataset = resolved.dataset_cls(resolved.dataset_config)
    method, network = build_model(resolved, dataset.spec, torch.device("cpu"), seed=0)
    evaluation = end_of_run(method, network.eval(), dataset, resolved, "cpu")
    assert [row.sampler for row in evaluation.rows] == ["ode/euler/uniform"] * 2
    assert "ode/euler/uniform" in evaluation.table().splitlines()[1]
    trained = TrainedModel(resolved, method, network, dataset.spec, tmp_path / "x.pt", "0" * 64,
                           resolved.config.train.max_steps)
    result = evaluate_model(trained, EvalSettings(metrics=("energy", "ode_error"), nfes=(1, 3), n=40, seed=1234),
                            log=None)
    for row in evaluation.rows:
        assert row.metric == result.values["energy"][row.nfe] and row.ode_error == result.values["ode_error"][row.nfe]
    assert evaluation.signatures == result.signatures
    steps = resolved.config.train.max_steps
    assert result.signatures["ode_error"].endswith(f"sampler=ode/euler/uniform weights=ema step={steps} ref=own:rk4x4rho2")


# --------------------------------------------------------------------------------------------
# the commands with --sampler


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("fm-runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "30", "--batch-size", "32",
                     "--runs-dir", str(runs), "--quiet", "--nfe", "1,2,4", *TINY_EVAL]) == 0
    return runs, re.search(r"MLflow run: (\w+)", out.getvalue()).group(1)


def _eval_json(capsys, runs, run_id, *extra):
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--runs-dir", str(runs), "--nfe", "2,4", "--n", "48", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_with_another_sampler_gives_other_numbers_under_its_own_keys(fm_run, capsys):
    from mlflow.tracking import MlflowClient

    runs, run_id = fm_run
    own = _eval_json(capsys, runs, run_id)
    other = _eval_json(capsys, runs, run_id, "--sampler", "consistency")
    assert own["sampler"] == "ode/euler/uniform" and other["sampler"] == "consistency/uniform"
    assert other["protocol"]["sampler"]["name"] == "consistency"
    assert set(other["metrics"]) == {f"eval-consistency/{m}/nfe{k}" for m in ("energy", "ode_error") for k in (2, 4)}
    for k in (2, 4):
        assert other["metrics"][f"eval-consistency/energy/nfe{k}"] != own["metrics"][f"eval/energy/nfe{k}"]
    tags = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["distillkit.eval-consistency.energy"].startswith("n=48 seed=1234 sampler=consistency/uniform ")
    # The printed table names the sampler in its header and its rows.
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--runs-dir", str(runs), "--nfe", "2", "--n", "48", "--no-log",
                 "--sampler", "consistency", "--metric", "energy"]) == 0
    out = capsys.readouterr().out
    assert "(consistency sampler, uniform grid," in out and out.splitlines()[-1].endswith("consistency/uniform")


def test_sample_with_another_sampler_records_it(fm_run, tmp_path, capsys):
    runs, run_id = fm_run
    common = ["sample", "--run", run_id, "--runs-dir", str(runs), "--nfe", "2", "--n", "6"]
    assert main([*common, "--out", str(tmp_path / "ode.npz")]) == 0
    assert main([*common, "--sampler", "consistency", "--out", str(tmp_path / "cm.npz")]) == 0
    assert "(consistency sampler, uniform grid" in capsys.readouterr().err
    ode, cm = np.load(tmp_path / "ode.npz"), np.load(tmp_path / "cm.npz")
    assert json.loads(str(ode["meta"]))["sampler"] == "ode/euler"
    assert json.loads(str(cm["meta"]))["sampler"] == "consistency"
    assert not np.allclose(ode["nfe2"], cm["nfe2"])
    # sampler and grid options through --set
    assert main([*common, "--grid", "edm", "--set", "sample.grid_options.rho=3", "--out", str(tmp_path / "e.npz")]) == 0
    assert json.loads(str(np.load(tmp_path / "e.npz")["meta"]))["grid_options"] == {"rho": 3}
    capsys.readouterr()
    code = main([*common, "--set", "sample.sampler_options.nope=1", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope" in err


COMPARE = ["--dataset", "toy2d", "--budget-images", "96", "--batch-size", "32", "--nfe", "1,2", "--n", "32",
           "--set", "sample.reference_steps=4", "--quiet"]


def test_compare_evaluates_with_each_methods_sampler_or_the_one_asked_for(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["compare", "--methods", "fm", "--runs-dir", str(runs), *COMPARE]
    assert main(argv) == 0
    own = capsys.readouterr().out
    assert "| fm | ode/euler/uniform |" in own
    assert main([*argv, "--sampler", "consistency"]) == 0
    captured = capsys.readouterr()
    assert "| fm | consistency/uniform |" in captured.out and "(reused)" in captured.out
    assert "evaluating energy, ode_error at NFE 1,2" in captured.err  # the reused child, measured anew

    def energies(markdown):
        section = markdown.split("## energy")[1].split("##")[0]
        return re.search(r"\| fm \| ([\d.]+) \| ([\d.]+) \|", section).groups()

    assert energies(own) != energies(captured.out)


def test_compare_refuses_a_sampler_a_method_cannot_use_before_training(tmp_path, capsys, monkeypatch):
    fm = distillkit.get_registries().methods.get("fm")
    monkeypatch.setattr(fm, "samplers", ("ode",))
    runs = tmp_path / "runs"
    code = main(["compare", "--methods", "fm", "--runs-dir", str(runs), *COMPARE, "--sampler", "consistency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"--sampler='consistency' .*is not allowed: a sampler method fm can use: ode", err), err
    assert not runs.exists()
