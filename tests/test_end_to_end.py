"""The first end-to-end slice: train, checkpoint, evaluate, track in MLflow."""

import re

import pytest
import torch

from distillkit.cli.main import main

SMALL_EVAL = ["--set", "sample.num_samples=64", "--set", "sample.reference_steps=4"]


def test_cud_run_is_tracked_in_mlflow_with_params_metrics_and_artifacts(capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    code = main([
        "run", "--method", "cud", "--integrator", "rk2", "--max-steps", "12", "--batch-size", "16",
        "--runs-dir", str(runs), "--quiet", "--nfe", "1,2", *SMALL_EVAL,
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "cud (rk2) on digits: final training loss" in out
    run_id = re.search(r"MLflow run: (\w+)", out).group(1)
    uri = f"sqlite:///{runs.resolve() / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    assert re.search(r"^\s+1\s+1\s+[\d.]+\s+[\d.]+", out, re.M)  # the per-NFE table

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "cud" and run.data.params["integrator"] == "rk2"
    assert run.data.params["method_options.tn"] == "16" and run.data.params["train.max_steps"] == "12"
    assert run.data.tags["distillkit.method"] == "cud" and run.data.tags["distillkit.backbone"] == "unet"
    assert run.data.tags["distillkit.cpu_threads"] == "1"  # the thread count of conftest's OMP_NUM_THREADS
    for key in ("eval/fd_pixels/nfe1", "eval/fd_pixels/nfe2", "eval/ode_error/nfe2", "train/loss"):
        assert key in run.data.metrics
    assert run.data.metrics["cost/network_evals_no_grad"] == 4
    assert len(client.get_metric_history(run_id, "train/loss")) >= 1
    artifacts = {a.path for folder in ("checkpoints", "samples") for a in client.list_artifacts(run_id, folder)}
    assert artifacts == {"checkpoints/checkpoint.pt", "samples/samples.png"}
    # Artifacts live under the runs directory, not wherever the process happened to run.
    assert (runs / "artifacts").is_dir()


def test_checkpoint_loads_safely_and_restores_the_ema_model(tmp_path, capsys, registries):
    from distillkit.training.checkpoint import load_checkpoint

    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "5", "--no-track", "--quiet",
                 "--runs-dir", str(tmp_path), *SMALL_EVAL]) == 0
    path = re.search(r"checkpoint: (\S+)", capsys.readouterr().out).group(1)
    payload = load_checkpoint(path)  # weights_only=True inside
    assert payload["step"] == 5 and payload["config"]["method"] == "fm"
    backbone_cls = registries.backbones.get(payload["config"]["backbone"])
    from distillkit import DataSpec

    model = backbone_cls.build(backbone_cls.config_class(), DataSpec((2,)))
    model.load_state_dict(payload["ema"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_checkpointed_ema_is_the_average_of_the_student_weights_it_saw(tmp_path, capsys):
    """The EMA in the checkpoint, recomputed from the student weights saved after every step:
    update 0 copies the student, update n >= 1 keeps decay d_n = min(0.9, (1 + n) / (10 + n))."""
    from distillkit.trained import load_trained_model
    from distillkit.training.checkpoint import load_checkpoint

    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "5", "--no-track", "--quiet",
                 "--checkpoint-every", "1", "--set", "train.keep_last=10", "--set", "train.ema_decay=[0.9]", "--lr", "0.02",
                 "--runs-dir", str(tmp_path), *SMALL_EVAL]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    students = [load_checkpoint(run_dir / "checkpoints" / f"step-{s:08d}.pt")["student"] for s in range(1, 6)]
    expected = {k: v.double() for k, v in students[0].items()}
    for n in range(1, 5):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = {k: decay * expected[k] + (1 - decay) * students[n][k].double() for k in expected}
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    for key, value in expected.items():
        assert torch.allclose(payload["ema"][key].double(), value, rtol=0, atol=1e-6), key
    # The average lags the online weights: a checkpoint saving the student as its EMA is caught.
    assert max((payload["ema"][k] - payload["student"][k]).abs().max() for k in expected) > 1e-4
    restored = load_trained_model(run_dir / "checkpoint.pt", weights="ema")
    for key, value in restored.model.state_dict().items():
        assert torch.allclose(value.double(), expected[key], rtol=0, atol=1e-6), key


def test_corrupted_checkpoint_is_a_usage_error(tmp_path):
    from distillkit.errors import UsageError
    from distillkit.training.checkpoint import load_checkpoint, save_atomic

    path = save_atomic({"format": "distillkit-checkpoint", "x": torch.ones(1000)}, tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UsageError, match="truncated or corrupted"):
        load_checkpoint(path)


def test_flow_matching_learns_the_toy_mixture(tmp_path, capsys):
    def energy_at_8(steps):
        assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", str(steps), "--no-track",
                     "--quiet", "--runs-dir", str(tmp_path), "--nfe", "8", "--set", "sample.num_samples=400",
                     "--set", "sample.reference_steps=4"]) == 0
        out = capsys.readouterr().out
        assert "fm on toy2d: final training loss" in out  # no "(euler)": fm takes no integrator
        return float(re.search(r"^\s+8\s+8\s+([\d.]+)", out, re.M).group(1))

    untrained, trained = energy_at_8(1), energy_at_8(400)
    assert trained < 0.05 and trained < untrained / 4


def test_a_run_reports_its_eta_and_its_evaluation_as_it_goes(tmp_path, capsys):
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "20", "--batch-size", "16", "--no-track",
                 "--runs-dir", str(tmp_path), "--nfe", "1,2", *SMALL_EVAL]) == 0
    err = capsys.readouterr().err.splitlines()
    eta = [line for line in err if line.startswith("distillkit: ETA ")]
    assert len(eta) == 1 and "training ~" in eta[0] and "evaluation ~" in eta[0], err
    started = next(i for i, line in enumerate(err) if line.startswith("distillkit: training done; end-of-run evaluation"))
    assert err.index(eta[0]) < started
    assert [line.split(":")[0].strip() for line in err[started:] if line.startswith("  NFE ")] == ["NFE 1", "NFE 2"]


def test_the_end_of_run_samples_png_labels_each_nfe_like_distillkit_sample(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    assert main(["run", "--method", "fm", "--dataset", "digits", "--max-steps", "2", "--batch-size", "16", "--no-track",
                 "--quiet", "--runs-dir", str(tmp_path), "--nfe", "1,2", *SMALL_EVAL]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    pixels = np.asarray(Image.open(run_dir / "samples.png").convert("L"))
    # image_grid's layout: a 64-pixel white margin on the left holding the "NFE k" labels (text
    # near its left edge only), the images to its right.
    margin = pixels[:, :64]
    assert (margin[:, 44:] == 255).all()
    text_rows = np.flatnonzero((margin[:, :44] < 128).any(axis=1))
    assert len(text_rows) > 0 and text_rows.min() < 20  # the first label, at the top
    assert (text_rows > pixels.shape[0] // 2).any()  # the second label, in the lower block
    assert (pixels[:, 64:] < 128).any()
