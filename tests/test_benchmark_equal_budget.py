"""benchmarks/equal_budget.py end to end on digits, with MLflow made unimportable (the GPU machine
has none): equal steps per variant, the network evaluations each method reports, finite quality
numbers per variant x NFE, a teacher trained apart from the budget, and one-line input errors."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "equal_budget.py"
# `import mlflow` raises ImportError from here on; the script runs as `python benchmarks/equal_budget.py` would.
WRAPPER = ("import runpy, sys; sys.modules['mlflow'] = None; sys.path.insert(0, sys.argv[1]); "
           "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["DISTILLKIT_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-c", WRAPPER, str(SCRIPT.parent), str(SCRIPT), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _cost_rows(markdown: str) -> dict[str, list[str]]:
    section = markdown.split("## Cost", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in rows[1:]}  # rows[0] is the column header


def test_equal_budget_trains_every_variant_on_the_same_images_without_mlflow(tmp_path):
    from distillkit.comparison import steps_for_budget

    out = tmp_path / "results" / "r.md"
    done = _run(tmp_path, "--dataset", "digits", "--variants", "fm,cud-euler,cd", "--budget-images", "256",
                "--batch-size", "32", "--teacher-images", "128", "--n", "64", "--nfe", "1,2", "--metrics", "fd_pixels",
                "--device", "cpu", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    steps = steps_for_budget(256, 32)
    assert steps == 8

    markdown = out.read_text()
    assert markdown.startswith("# Equal training budget on digits: 256 training images per variant")
    assert "**not** counted in the budget" in markdown and "4 steps × 32 = 128 images" in markdown
    cost = _cost_rows(markdown)
    assert list(cost) == ["fm", "cud-euler", "cd"]
    # (with grad + no grad): fm one pass; CUD-Euler 1 stage + 1 look-ahead head; CD heun's 2 stages + the target.
    expected = {"fm": "1 + 0", "cud-euler": "1 + 2", "cd": "1 + 3"}
    for label, cells in cost.items():
        assert cells[1] == f"{steps} × 32" and cells[2] == expected[label], cells
        assert float(cells[3]) > 0 and float(cells[4].replace(",", "")) > 0
    assert cost["fm"][5] == "1.00×" and re.fullmatch(r"\d+\.\d\d×", cost["cd"][5])
    quality = markdown.split("## fd_pixels", 1)[1].split("\n## ", 1)[0]
    assert "| NFE 1 | NFE 2 |" in quality and quality.count("**") == 4  # one best per column

    data = json.loads(out.with_suffix(".json").read_text())
    assert data["budget_images"] == 256 and data["nfe"] == [1, 2] and data["metrics"] == ["fd_pixels"]
    assert data["machine"]["device"] == "cpu" and "equal_budget.py" in data["command"]
    assert [v["label"] for v in data["variants"]] == ["fm", "cud-euler", "cd"]
    for v in data["variants"]:
        assert v["steps"] == steps and v["batch_size"] == 32 and v["training_images"] == 256
        assert v["config"]["train"]["max_steps"] == steps and v["config"]["seed"] == 0
        assert v["timed_steps"] == 6 and v["seconds_per_step"] > 0  # end of step 1 to end of step 7
        assert set(v["values"]["fd_pixels"]) == {"1", "2"}
        assert all(math.isfinite(x) for x in v["values"]["fd_pixels"].values())
    by_label = {v["label"]: v for v in data["variants"]}
    assert by_label["cud-euler"]["integrator"] == "euler" and by_label["fm"]["integrator"] == "none"
    teacher = data["teacher"]
    assert teacher["steps"] == 4 and teacher["config"]["method"] == "fm" and teacher["config"]["train"]["max_steps"] == 4
    assert by_label["cd"]["config"]["teacher"] == teacher["checkpoint"] and Path(teacher["checkpoint"]).is_file()
    assert "teacher" not in by_label["fm"]["config"] or not by_label["fm"]["config"]["teacher"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_equal_budget_unknown_variant_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "r.md"
    done = _run(tmp_path, "--dataset", "digits", "--variants", "fm,cud-rk9", "--budget-images", "64",
                "--out", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cud-rk9" in lines[0] and "rk3" in lines[0] and "Traceback" not in done.stderr
    assert not out.exists() and not out.with_suffix(".json").exists() and not (tmp_path / "work").exists()
