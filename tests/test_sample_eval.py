"""``distillkit sample`` and ``distillkit eval`` on tiny trained runs: per-sample determinism, the
output files, metrics and protocol logged to the same MLflow run, and one-line errors."""

import json
import re
import urllib.error

import numpy as np
import pytest
import torch

from distillkit.cli.main import main

TINY_EVAL = ["--set", "sample.num_samples=64", "--set", "sample.reference_steps=4"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tracked fm run on toy2d (its own SQLite store): (runs dir, run id)."""
    runs = tmp_path_factory.mktemp("toy-runs")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "8", "--batch-size", "32",
                     "--runs-dir", str(runs), "--quiet", "--nfe", "1,2", *TINY_EVAL])
    assert code == 0
    return runs, re.search(r"MLflow run: (\w+)", out.getvalue()).group(1)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A class-conditional cud (rk2) network for digits as a run folder: (runs dir, checkpoint path).

    Written directly rather than trained by ``distillkit run``: the trainer's end-of-run evaluation
    does not pass labels to class-conditional models yet (it would need ``evaluate(...,
    velocity_for=...)``), so a conditional CLI run stops after its checkpoint. The weights are the
    initial ones, perturbed so that every head (CUD's zero-initialised ones too) produces output.
    """
    import distillkit
    from distillkit.config import run_config_from_dict
    from distillkit.resolve import resolve
    from distillkit.trained import CONVENTION
    from distillkit.training.build import build_model
    from distillkit.training.checkpoint import FORMAT, VERSION, save_atomic

    runs = tmp_path_factory.mktemp("digits-runs")
    tree = {"method": "cud", "integrator": "rk2", "dataset": "digits", "runs_dir": str(runs),
            "dataset_options": {"class_conditional": True}, "train": {"max_steps": 4, "batch_size": 16},
            "sample": {"num_samples": 64, "reference_steps": 4}}
    resolved = resolve(run_config_from_dict(tree), distillkit.get_registries())
    _, student = build_model(resolved, distillkit.DataSpec((1, 8, 8), 10), torch.device("cpu"), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    state = student.state_dict()
    path = save_atomic({"format": FORMAT, "version": VERSION, "convention": CONVENTION, "config": resolved.to_dict(),
                        "data_spec": {"shape": [1, 8, 8], "num_classes": 10}, "run_id": None, "step": 4,
                        "student": state, "ema": state, "emas": {"ema_0.999": state}},
                       runs / "runs" / "untracked-conditional" / "checkpoint.pt")
    return runs, str(path)


def _one_line_error(capsys, argv, *, match: str):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("distillkit: error: "), err
    assert re.search(match, err), err
    return err


# --------------------------------------------------------------------------------------------
# sample


def test_sample_i_is_the_same_whatever_the_batch_size_and_count(digits_run, tmp_path, capsys):
    runs, checkpoint = digits_run
    common = ["sample", "--run", checkpoint, "--nfe", "1,2", "--seed", "7"]
    assert main([*common, "--n", "20", "--batch-size", "20", "--out", str(tmp_path / "a.npz")]) == 0
    assert main([*common, "--n", "20", "--batch-size", "3", "--out", str(tmp_path / "b.npz")]) == 0
    assert main([*common, "--n", "9", "--batch-size", "4", "--out", str(tmp_path / "c.npz")]) == 0
    a, b, c = (np.load(tmp_path / f"{name}.npz") for name in "abc")
    for key in ("nfe1", "nfe2"):
        assert a[key].shape == (20, 1, 8, 8) and a[key].dtype == np.float32
        # Batched kernels may round differently; nothing else differs.
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
        np.testing.assert_allclose(a[key][:9], c[key], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["labels"][:9], c["labels"])
    np.testing.assert_array_equal(a["seeds"], np.arange(7, 27))
    meta = json.loads(str(a["meta"]))
    assert meta["seed"] == 7 and meta["nfe"] == [1, 2] and meta["weights"] == "ema"
    assert not np.allclose(a["nfe1"][0], a["nfe1"][1])  # different seeds, different samples


def test_class_conditional_samples_use_per_sample_labels_as_cond(digits_run, tmp_path):
    from distillkit.evaluation import class_labels
    from distillkit.sampling import prior_noise, sampling_grid
    from distillkit.trained import load_trained_model
    import distillkit

    _, checkpoint = digits_run
    labels = class_labels(12, 10, 3)
    assert torch.equal(labels[4:], class_labels(8, 10, 3, start=4))  # label i depends on seed + i only
    assert 0 <= int(labels.min()) and int(labels.max()) < 10 and len(set(labels.tolist())) > 1
    assert main(["sample", "--run", checkpoint, "--nfe", "1", "--n", "12", "--seed", "3",
                 "--out", str(tmp_path / "s.npz")]) == 0
    saved = np.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(saved["labels"], labels.numpy())
    trained = load_trained_model(checkpoint)
    by_hand = distillkit.integrate(trained.velocity_fn(labels), prior_noise(12, (1, 8, 8), 3),
                                   sampling_grid("uniform", 1), "euler")
    np.testing.assert_allclose(saved["nfe1"], by_hand.numpy(), atol=1e-5)


def test_sample_writes_png_and_npz_by_suffix_or_both_into_a_folder(digits_run, toy_run, tmp_path, capsys):
    from PIL import Image

    _, checkpoint = digits_run
    assert main(["sample", "--run", checkpoint, "--nfe", "1,2,4", "--n", "10", "--out", str(tmp_path / "grid.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG" and image.width > image.height > 0
    folder = tmp_path / "both"
    runs, _ = digits_run  # a run folder name under --runs-dir works as --run too
    assert main(["sample", "--run", "untracked-conditional", "--runs-dir", str(runs), "--nfe", "1", "--n", "4",
                 "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["samples.npz", "samples.png"]
    # toy2d: a scatter plot per NFE, by MLflow run id from its runs directory.
    runs, run_id = toy_run
    assert main(["sample", "--run", run_id, "--runs-dir", str(runs), "--nfe", "1,2", "--n", "50",
                 "--out", str(tmp_path / "toy.png")]) == 0
    with Image.open(tmp_path / "toy.png") as image:
        assert image.format == "PNG"
    capsys.readouterr()
    _one_line_error(capsys, ["sample", "--run", checkpoint, "--out", str(tmp_path / "x.jpg")], match=r"--out=.*\.png")
    assert not (tmp_path / "x.jpg").exists()


# --------------------------------------------------------------------------------------------
# eval


def test_eval_logs_metrics_and_protocol_to_the_same_run_without_touching_params(toy_run, capsys):
    from mlflow.tracking import MlflowClient

    runs, run_id = toy_run
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    before = client.get_run(run_id)
    trained_energy = before.data.metrics["eval/energy/nfe2"]
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--runs-dir", str(runs), "--nfe", "1,2,4", "--n", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["logged"] and report["run_id"] == run_id
    after = client.get_run(run_id)
    assert after.data.params == before.data.params  # params are never logged again
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    for key in ("eval/energy/nfe1", "eval/energy/nfe4", "eval/ode_error/nfe1", "eval/ode_error/nfe4"):
        assert after.data.metrics[key] == pytest.approx(report["metrics"][key])
    # Same protocol as the end-of-run evaluation (64 samples from seed 1234): the same number.
    assert after.data.metrics["eval/energy/nfe2"] == pytest.approx(trained_energy, rel=1e-6)
    tags = after.data.tags
    assert tags["distillkit.eval.energy"].startswith("n=64 seed=1234 sampler=ode/euler/uniform weights=ema step=8")
    assert tags["distillkit.eval.energy"].endswith("nfe=1,2,4")
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/eval-energy.json", "eval/eval-ode_error.json"}
    protocol = json.loads(open(client.download_artifacts(run_id, "eval/eval-energy.json")).read())
    ode = json.loads(open(client.download_artifacts(run_id, "eval/eval-ode_error.json")).read())
    assert protocol["n"] == 64 and protocol["weights"] == "ema" and protocol["nfe"] == [1, 2, 4]
    assert protocol["seeds"]["first"] == 1234 and "seed (first + i)" in protocol["seeds"]["rule"]
    assert "reference_samples" in protocol["metrics"]["energy"]["reference"]
    assert "rk4" in ode["metrics"]["ode_error"]["reference"] and set(ode["metrics"]) == {"ode_error"}
    assert protocol["results"]["eval/energy/nfe1"] == pytest.approx(report["metrics"]["eval/energy/nfe1"])
    assert set(protocol["results"]) == {f"eval/energy/nfe{k}" for k in (1, 2, 4)}

    # Other weights and samplers get their own keys; the default ones stay as they were.
    assert main(["eval", "--run", run_id, "--runs-dir", str(runs), "--nfe", "2", "--n", "64", "--weights", "online",
                 "--integrator", "heun", "--metric", "energy"]) == 0
    metrics = client.get_run(run_id).data.metrics
    assert "eval-heun-online/energy/nfe2" in metrics
    assert metrics["eval/energy/nfe2"] == pytest.approx(trained_energy, rel=1e-6)


def test_eval_ode_error_against_a_teacher_without_logging(toy_run, capsys):
    runs, run_id = toy_run
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--runs-dir", str(runs), "--nfe", "1", "--n", "32", "--metric", "ode_error",
                 "--teacher", "toy2d-exact", "--no-log", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["logged"] and report["metrics"]["eval/ode_error_teacher/nfe1"] > 0
    assert "toy2d-exact" in report["protocol"]["metrics"]["ode_error_teacher"]["reference"]


def test_eval_of_an_image_run_with_the_classifier_metric(digits_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    _, checkpoint = digits_run
    capsys.readouterr()
    assert main(["eval", "--run", checkpoint, "--nfe", "1,2", "--n", "40", "--no-log", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["metrics"]) == {f"eval/{m}/nfe{k}" for m in ("fd_pixels", "classifier_fd", "ode_error")
                                      for k in (1, 2)}
    assert report["protocol"]["labels"].startswith("uniform over 10 classes")
    assert report["protocol"]["metrics"]["classifier_fd"]["classifier"].startswith("classifier-digits-v1-")
    assert list((tmp_path / "cache" / "classifiers").glob("classifier-digits-v1-*.pt"))


@pytest.mark.parametrize("argv, match", [
    (["--run", "0123456789abcdef0123456789abcdef"], r"0123456789abcdef0123456789abcdef"),
    (["--run", "no-such-run"], r"--run='no-such-run': not a checkpoint file"),
    (["--metric", "fd_pixels,inception_score"], r"--metric='inception_score' is not allowed: one or more of .*fd_pixels"),
    (["--metric", "fd_pixels"], r"--metric='fd_pixels' is not allowed: a metric for this data"),
    (["--nfe", "1,0"], r"--nfe='1,0' is not allowed: one or more positive integers"),
    (["--nfe", "two"], r"--nfe='two' is not allowed"),
    (["--nfe", "3", "--integrator", "heun"], r"--nfe=3 is not allowed: heun spends 2 evaluations"),
    (["--integrator", "rk9"], r"--integrator='rk9' is not allowed: unknown integrator"),
    (["--weights", "ema_0.5"], r"weights='ema_0.5' is not allowed: ema, online, ema_0.999"),
    (["--n", "0"], r"--n='0' is not allowed: a positive integer"),
    (["--grid", "cosine"], r"--grid='cosine' is not allowed: unknown grid; available: edm, .*uniform"),
])
def test_bad_eval_input_is_one_line_and_exit_2(toy_run, capsys, argv, match):
    runs, run_id = toy_run
    base = ["eval", "--run", run_id, "--runs-dir", str(runs), "--n", "16"]
    _one_line_error(capsys, [*base, *argv], match=match)


def test_unknown_run_id_in_an_existing_store_and_in_a_missing_one(toy_run, tmp_path, capsys):
    runs, _ = toy_run
    _one_line_error(capsys, ["sample", "--run", "f" * 32, "--runs-dir", str(runs), "--out", str(tmp_path / "a.png")],
                    match=r"run f{32} cannot be read")
    _one_line_error(capsys, ["eval", "--run", "f" * 32, "--runs-dir", str(tmp_path / "nothing")],
                    match=r"no MLflow store at")
    assert not (tmp_path / "nothing").exists()  # no empty database was created
    assert not (tmp_path / "a.png").exists()


def test_fid_without_weights_offline_is_one_line(digits_run, tmp_path, monkeypatch, capsys):
    import cleanfid.inception_torchscript

    _, checkpoint = digits_run
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILLKIT_INCEPTION_WEIGHTS", str(tmp_path / "missing.pt"))
    _one_line_error(capsys, ["eval", "--run", checkpoint, "--metric", "fid", "--no-log"],
                    match=r"DISTILLKIT_INCEPTION_WEIGHTS=.*missing.pt.*no such file")
    # No file anywhere and no internet: clean-fid's own download fails -> one line, exit 2.
    monkeypatch.delenv("DISTILLKIT_INCEPTION_WEIGHTS")

    def offline(fpath="./"):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", offline)
    _one_line_error(capsys, ["eval", "--run", checkpoint, "--metric", "fid", "--no-log"],
                    match=r"FID needs the Inception-V3 weights and downloading .* failed \(URLError.*--inception-weights")
    _one_line_error(capsys, ["fid-stats", "--dataset", "digits", "--inception-weights", str(tmp_path / "nope.pt")],
                    match=r"--inception-weights='.*nope.pt': no such file")
    assert not (tmp_path / "cache").exists()


def test_end_of_run_evaluation_gives_class_conditional_models_the_eval_labels(digits_run, tmp_path):
    """``evaluation.evaluate(..., velocity_for=...)``: what the trainer needs to evaluate a
    class-conditional run at its end; it measures what ``distillkit eval`` measures."""
    import distillkit
    from distillkit.config import SampleConfig
    from distillkit.evaluation import EvalSettings, evaluate, evaluate_model
    from distillkit.trained import load_trained_model
    from distillkit_datasets import Digits, DigitsConfig

    _, checkpoint = digits_run
    trained = load_trained_model(checkpoint)
    registries = distillkit.get_registries()
    config = SampleConfig(nfe=(1, 2), num_samples=32, reference_steps=4)
    end_of_run = evaluate(None, Digits(DigitsConfig(class_conditional=True)), trained.spec, config,
                          registries.integrators.get("euler"), registries.integrators.get("rk4"), torch.device("cpu"),
                          velocity_for=trained.velocity_fn)
    settings = EvalSettings(metrics=("fd_pixels", "ode_error"), nfes=(1, 2), n=32, seed=config.seed,
                            integrator="euler", grid="uniform")
    result = evaluate_model(trained, settings, device=torch.device("cpu"), runs_dir=tmp_path)
    for row in end_of_run.rows:
        assert row.metric == pytest.approx(result.values["fd_pixels"][row.nfe], rel=1e-5)
        assert row.ode_error == pytest.approx(result.values["ode_error"][row.nfe], rel=1e-5)
