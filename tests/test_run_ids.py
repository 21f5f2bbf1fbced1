"""Run ids given as an unambiguous prefix (``compare`` prints 8 characters): expanded from the run
folders, else from the MLflow store; an ambiguous or unknown prefix is one line."""

import pytest

from distillkit.errors import UsageError
from distillkit.run_ids import expand_run_id

A = "ab120" + "0" * 27
B = "ab121" + "1" * 27
C = "cd99" + "2" * 28


@pytest.fixture
def runs_dir(tmp_path):
    for run_id in (A, B, C):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
    (tmp_path / "runs" / "untracked-20260101-000000-000000").mkdir()
    return tmp_path


def test_a_unique_prefix_is_the_full_id(runs_dir):
    assert expand_run_id("ab120", runs_dir=runs_dir) == A
    assert expand_run_id(C[:8], runs_dir=runs_dir) == C


def test_full_ids_files_folders_and_other_references_pass_unchanged(runs_dir, tmp_path):
    assert expand_run_id(A, runs_dir=runs_dir) == A
    assert expand_run_id("auto", runs_dir=runs_dir) == "auto"
    assert expand_run_id("untracked-20260101-000000-000000", runs_dir=runs_dir) == "untracked-20260101-000000-000000"
    assert expand_run_id("toy2d-exact", runs_dir=runs_dir) == "toy2d-exact"
    assert expand_run_id("abc", runs_dir=runs_dir) == "abc"  # shorter than 4: not taken as a prefix
    named = tmp_path / "beef"
    named.write_text("a file named like a prefix")
    assert expand_run_id(str(named), runs_dir=runs_dir) == str(named)


def test_an_ambiguous_prefix_is_one_line_naming_the_candidates(runs_dir):
    with pytest.raises(UsageError, match=rf"^--resume=ab12: ambiguous, 2 run ids start with it \({A}, {B}\); "
                                         r"give more characters$"):
        expand_run_id("ab12", runs_dir=runs_dir, option="--resume")


def test_an_unknown_prefix_is_one_line(runs_dir):
    with pytest.raises(UsageError, match=r"^--run=ab1f: no run id starts with 'ab1f' \(looked in "):
        expand_run_id("ab1f", runs_dir=runs_dir)


def test_a_prefix_of_a_run_with_no_local_folder_is_found_in_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run("0").info.run_id
    assert expand_run_id(run_id[:8], runs_dir=tmp_path) == run_id
    assert expand_run_id(run_id[:8], runs_dir=tmp_path / "elsewhere", tracking_uri=uri) == run_id


def test_an_unknown_prefix_does_not_create_a_store(tmp_path):
    with pytest.raises(UsageError, match="no run id starts with"):
        expand_run_id("deadbeef", runs_dir=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()


def test_short_ids_work_for_resume_sample_export_and_teacher(tmp_path, capsys):
    import distillkit
    from distillkit.cli.main import main

    small = ["--set", "sample.num_samples=8", "--set", "sample.reference_steps=1", "--nfe", "1", "--quiet"]
    assert main(["run", "--method", "fm", "--dataset", "toy2d", "--max-steps", "2", "--batch-size", "8",
                 "--runs-dir", str(tmp_path), *small]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    short = run_dir.name[:8]
    capsys.readouterr()
    assert main(["run", "--resume", short, "--max-steps", "3", "--runs-dir", str(tmp_path), "--quiet"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    assert main(["sample", "--run", short, "--runs-dir", str(tmp_path), "--nfe", "1", "--n", "4",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()
    path, identity = distillkit.find_checkpoint(short, runs_dir=tmp_path)
    assert path == run_dir.resolve() / "checkpoint.pt" and identity == f"run:{run_dir.name}"
    assert main(["export", "--run", short, "--runs-dir", str(tmp_path), "--nfe", "1", "--format", "safetensors",
                 "--out", str(tmp_path / "generator.safetensors"), "--no-log"]) == 0
    assert distillkit.load_generator(tmp_path / "generator.safetensors").info["run_id"] == run_dir.name
    assert main(["eval", "--run", "ffff" + short, "--runs-dir", str(tmp_path), "--no-log"]) == 2
    assert "no run id starts with" in capsys.readouterr().err
