"""``distillkit compare`` on toy2d: one parent, one child per method at an equal budget, tags,
table / CSV / plot artifacts on the parent, children reused on a second call, one-line errors."""

import csv
import io
import re

import pytest

from distillkit.cli.main import main

TINY = ["--dataset", "toy2d", "--budget-images", "200", "--batch-size", "32", "--nfe", "1,2", "--n", "48",
        "--set", "sample.reference_steps=4", "--quiet"]


def _runs(client, experiment_id):
    return client.search_runs([experiment_id], max_results=100)


def test_compare_trains_children_under_one_parent_and_reuses_them(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from distillkit.comparison import steps_for_budget

    runs = tmp_path / "runs"
    argv = ["compare", "--methods", "fm,cud", "--runs-dir", str(runs), *TINY,
            "--set", "cud:method_options.tn=8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    parent_id = re.search(r"parent run: (\w+)", out).group(1)
    assert "## energy" in out and "## ode_error" in out and "| fm |" in out and "| cud |" in out

    client = MlflowClient(tracking_uri=f"sqlite:///{runs.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distillkit-compare")
    everything = _runs(client, experiment.experiment_id)
    assert len(everything) == 3
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["distillkit.compare"] == "parent"
    assert parent.data.params["budget_images"] == "200" and parent.data.params["dataset"] == "toy2d"
    children = [r for r in everything if r.info.run_id != parent_id]
    steps = steps_for_budget(200, 32)
    assert steps == 7
    by_method = {c.data.tags["distillkit.method"]: c for c in children}
    assert set(by_method) == {"fm", "cud"}
    for method, child in by_method.items():
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["distillkit.dataset"] == "toy2d" and tags["distillkit.backbone"] == "mlp"
        assert tags["distillkit.plugin_dist"] == "distillkit==0.1.0" and tags["distillkit.plugin"] == method
        assert child.data.params["train.max_steps"] == str(steps) and child.data.params["train.batch_size"] == "32"
        for key in ("eval/energy/nfe1", "eval/energy/nfe2", "eval/ode_error/nfe2", "cost/wall_seconds",
                    "cost/images_per_second", "cost/network_evals_with_grad"):
            assert key in child.data.metrics, key
    assert by_method["cud"].data.tags["distillkit.integrator"] == "euler"
    assert by_method["fm"].data.tags["distillkit.integrator"] == "none"
    assert by_method["cud"].data.params["method_options.tn"] == "8"  # METHOD:KEY=VALUE reached cud only
    assert by_method["cud"].data.metrics["cost/network_evals_no_grad"] > by_method["fm"].data.metrics["cost/network_evals_no_grad"]

    artifacts = {a.path for a in client.list_artifacts(parent_id, "comparison")}
    assert artifacts == {"comparison/comparison.md", "comparison/comparison.csv", "comparison/quality_vs_nfe.png",
                         "comparison/comparison.json"}
    table = open(client.download_artifacts(parent_id, "comparison/comparison.csv")).read()
    rows = list(csv.DictReader(io.StringIO(table)))
    assert {r["variant"] for r in rows} == {"fm", "cud"}
    assert {"energy@nfe1", "energy@nfe2", "ode_error@nfe1", "training_images", "images_per_second",
            "network_evals_with_grad", "wall_seconds"} <= set(rows[0])
    assert all(int(r["training_images"]) == steps * 32 for r in rows)
    for r in rows:
        assert float(r["energy@nfe2"]) == pytest.approx(by_method[r["method"]].data.metrics["eval/energy/nfe2"])
    with open(client.download_artifacts(parent_id, "comparison/quality_vs_nfe.png"), "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "## Cost" in parent.data.tags["mlflow.note.content"]
    # The parent carries each child's final quality, named by variant, to sort and chart in the UI.
    for method, child in by_method.items():
        for nfe in (1, 2):
            assert parent.data.metrics[f"{method}/energy/nfe{nfe}"] == pytest.approx(
                child.data.metrics[f"eval/energy/nfe{nfe}"])
        assert parent.data.metrics[f"{method}/cost/train_seconds"] == pytest.approx(
            child.data.metrics["cost/train_seconds"])
    # The 8-character ids the table prints are accepted where a run id is.
    short = by_method["fm"].info.run_id[:8]
    assert f"`{short}`" in out
    assert main(["eval", "--run", short, "--runs-dir", str(runs), "--nfe", "1", "--n", "16", "--metric", "energy",
                 "--no-log"]) == 0
    assert "energy" in capsys.readouterr().out

    # Second call with one more NFE: same parent, no new child, only the new NFE measured.
    assert main([*argv[:-2], "--set", "cud:method_options.tn=8", "--nfe", "1,2,4"]) == 0
    captured = capsys.readouterr()
    assert f"parent run: {parent_id}" in captured.out and captured.out.count("(reused)") == 2
    assert "evaluating energy, ode_error at NFE 4" in captured.err
    assert len(_runs(client, experiment.experiment_id)) == 3
    child = client.get_run(by_method["fm"].info.run_id)
    assert child.data.tags["distillkit.eval.energy"].endswith("nfe=1,2,4")
    # A changed shared training option is another comparison: a new parent and a new child.
    assert main(["compare", "--methods", "fm", "--runs-dir", str(runs), *TINY, "--set", "train.lr=1e-3"]) == 0
    assert "training" in capsys.readouterr().err
    assert len(_runs(client, experiment.experiment_id)) == 5


@pytest.mark.parametrize("argv, match", [
    (["--methods", "fm,nope"], r"--methods='nope' is not allowed: unknown method"),
    (["--methods", "fm,pd"], r"--teacher='' is not allowed: a teacher .* for pd"),
    (["--methods", "fm", "--metric", "fd_pixels"], r"--metric='fd_pixels' is not allowed: a metric for this data"),
    (["--methods", "fm", "--metric", "sharpness"], r"--metric='sharpness' is not allowed"),
    (["--methods", "fm", "--nfe", "0"], r"--nfe='0' is not allowed"),
    (["--methods", "fm", "--set", "cud:method_options.tn=8"], r"METHOD:KEY=VALUE with METHOD one of fm"),
    (["--methods", "fm", "--set", "train.max_steps=5"], r"--budget-images sets it"),
    (["--methods", "fm", "--integrators", "rk7"], r"--integrators='rk7' is not allowed: unknown integrator"),
])
def test_bad_compare_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, match):
    runs = tmp_path / "runs"
    code = main(["compare", "--runs-dir", str(runs), *TINY, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("distillkit: error: "), err
    assert re.search(match, err), err
    assert not runs.exists()


def test_budget_gives_every_method_the_same_number_of_images():
    from distillkit.comparison import Override, Variant, child_tree, steps_for_budget, variants

    assert steps_for_budget(20_000, 128) == 157 and steps_for_budget(128, 128) == 1 and steps_for_budget(1, 128) == 1
    plan = variants(["cud", "fm"], ["euler", "rk3"], {"cud": True, "fm": False})
    assert [v.label for v in plan] == ["cud-euler", "cud-rk3", "fm"]
    base = {"dataset": "digits", "train": {"batch_size": 64}}
    tree = child_tree(base, Variant("cud", "rk3"), [Override.parse("cud-rk3:train.batch_size=100")],
                      teacher="", requires_teacher=False, budget_images=1000)
    assert tree["train"] == {"batch_size": 100, "max_steps": 10} and tree["integrator"] == "rk3"
    assert child_tree(base, Variant("fm", None), [], teacher="x", requires_teacher=False,
                      budget_images=1000)["train"]["max_steps"] == 16
