"""benchmarks/budget_curve.py end to end on digits at a tiny budget: the accounting of every point
(teacher + generated + student = total), checkpoints of one run for chains from scratch, one run
per point for --separate-runs, runs reused from --work, and one-line input errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "budget_curve.py"


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["DISTILLKIT_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


COMMON = ["--dataset", "digits", "--total-images", "256", "--teacher-images", "128", "--batch-size", "16",
          "--points", "2", "--nfe", "1,2", "--metrics", "fd_pixels", "--n", "32", "--threads", "1",
          "--set", "rf-distill:method_options.num_pairs=16", "--set", "rf-distill:method_options.pair_nfe=4"]


def test_budget_curve_counts_teacher_generated_and_student_images(tmp_path):
    work, out = tmp_path / "work", tmp_path / "r.md"
    done = _run(tmp_path, *COMMON, "--chains", "fm,fm>rf-distill,ct", "--separate-runs", "ct", "--work", str(work),
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    chains = {c["label"]: c["points"] for c in data["chains"]}
    assert list(chains) == ["fm", "fm>rf-distill", "ct"]
    # From scratch: the run's own checkpoints at 1/2 and 2/2 of 256 images (16 steps of 16).
    assert [p["student_images"] for p in chains["fm"]] == [128, 256]
    assert [Path(p["checkpoint"]).name for p in chains["fm"]] == ["step-00000008.pt", "step-00000016.pt"]
    # The student: the fm run's checkpoint at 128 images, 16 pairs x 4 rk4 evaluations = 64 generated,
    # and 256 - 128 - 64 = 64 images left = 4 steps (a multiple of --points).
    for p in chains["fm>rf-distill"]:
        assert p["teacher_images"] == 128 and p["generated_evals"] == 64
        assert p["total_images"] == p["teacher_images"] + p["generated_evals"] + p["student_images"]
    assert [p["student_images"] for p in chains["fm>rf-distill"]] == [32, 64]
    # --separate-runs: each point is its own run's final checkpoint.
    assert len({Path(p["checkpoint"]).parent for p in chains["ct"]}) == 2
    for points in chains.values():
        for p in points:
            assert set(p["values"]["fd_pixels"]) == {"1", "2"}
            assert all(v > 0 for v in p["values"]["fd_pixels"].values())
    assert out.with_suffix(".png").stat().st_size > 0
    markdown = out.read_text()
    assert "| fm>rf-distill | 128 | 64 | 64 | 256 |" in markdown

    # A rerun reuses every run and every point's values: nothing trains, same numbers.
    again = _run(tmp_path, *COMMON, "--chains", "fm,fm>rf-distill,ct", "--separate-runs", "ct", "--report-only",
                 "--work", str(work), "--out", str(tmp_path / "again.md"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr
    assert json.loads((tmp_path / "again.json").read_text())["chains"] == data["chains"]


def test_budget_curve_input_errors_are_one_line(tmp_path):
    cases = [(["--chains", "cd"], "--chains"), (["--chains", "fm>fm"], "--chains"),
             (["--chains", "fm", "--only", "cd"], "--only"), (["--chains", "fm", "--teacher-images", "512"], "--teacher-images")]
    for extra, option in cases:
        done = _run(tmp_path, *COMMON, *extra, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "x.md"))
        assert done.returncode == 2 and option in done.stderr, (extra, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "x.md").exists()
