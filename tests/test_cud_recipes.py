"""The paper's recipes (recipes/*.toml, METHODS.md §3.5, §5) resolve with ``--dry-run`` and say
what they should."""

import tomllib
from pathlib import Path

import pytest

import distillkit
from distillkit.cli.main import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(RECIPES.glob("cud*.toml"))


def resolved(capsys, path, tmp_path):
    """The recipe as ``--dry-run`` prints it. A dataset or backbone that is not registered in this
    installation is replaced by a built-in one (and said so), so that the method's options are
    still checked."""
    tree = tomllib.loads(path.read_text())
    registries = distillkit.get_registries()
    replaced = []
    if tree["dataset"] not in registries.datasets.names():
        replaced.append(tree["dataset"])
        tree["dataset"] = "digits"
        tree.pop("dataset_options", None)
    if tree.get("backbone", "auto") not in registries.backbones.names():
        replaced.append(tree["backbone"])
        tree["backbone"] = "unet"
        tree.pop("backbone_options", None)
    options = tree.get("method_options", {})
    if options.get("encoder", "auto") not in ("auto", *registries.backbones.names()):
        replaced.append(options["encoder"])
        options["encoder"] = "auto"
        options.pop("encoder_options", None)
    argv = ["run", "--config", str(path), "--dry-run"]
    if replaced:
        import tomli_w

        path = tmp_path / path.name
        path.write_text(tomli_w.dumps(tree))
        argv[2] = str(path)
    if registries.methods.get(tree["method"]).requires_teacher:
        argv += ["--teacher", "toy2d-exact"]  # not loaded by --dry-run; only required to be set
    assert main(argv) == 0
    return tomllib.loads(capsys.readouterr().out), tree, replaced


def test_there_are_recipes_for_the_papers_datasets():
    names = {f.stem for f in FILES}
    assert {"cud-mnist", "cud-cifar10", "cud-imagenet64", "cud-stage2-mnist", "cud-stage2-cifar10"} <= names


def resolves_with_every_value(capsys, path, tmp_path) -> dict:
    """Assert that the recipe at ``path`` resolves with every value it sets; the resolved tree.
    Shared by every method's recipe tests."""
    out, tree, replaced = resolved(capsys, path, tmp_path)
    if replaced:
        print(f"{path.name}: not registered here, replaced: {', '.join(replaced)}")
    for section in ("train", "sample", "method_options", "backbone_options", "dataset_options"):
        for key, value in tree.get(section, {}).items():
            got = out[section][key]
            if isinstance(value, dict):
                got = {k: got[k] for k in value}
            elif isinstance(got, list) and not isinstance(value, list):
                value = [value]  # a scalar for a list option (train.ema_decay = 0.9999)
            assert got == pytest.approx(value) if not isinstance(value, (str, dict)) else got == value, f"{section}.{key}"
    for key in ("method", "dataset", "backbone", "integrator"):
        if key in tree:
            assert out[key] == tree[key]
    return out


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_recipe_resolves_with_every_value_it_sets(capsys, path, tmp_path):
    resolves_with_every_value(capsys, path, tmp_path)


def test_the_papers_values(capsys, tmp_path):
    mnist = tomllib.loads((RECIPES / "cud-mnist.toml").read_text())
    cifar = tomllib.loads((RECIPES / "cud-cifar10.toml").read_text())
    imagenet = tomllib.loads((RECIPES / "cud-imagenet64.toml").read_text())
    assert (mnist["train"]["lr"], mnist["train"]["batch_size"], mnist["train"]["max_steps"]) == (3e-4, 256, 50000)
    assert (cifar["train"]["lr"], cifar["train"]["batch_size"], cifar["train"]["max_steps"]) == (2e-4, 128, 500000)
    assert (imagenet["train"]["lr"], imagenet["train"]["batch_size"]) == (4e-4, 1024)
    assert mnist["train"]["warmup_steps"] == cifar["train"]["warmup_steps"] == 5000
    assert imagenet["train"]["warmup_steps"] == 0 and imagenet["train"]["precision"] == "fp16"
    assert mnist["backbone_options"]["phi"] == 0.25  # what MNIST trained with (P2)
    assert cifar["backbone_options"]["phi"] == imagenet["backbone_options"]["phi"] == 0.75
    assert mnist["method_options"]["coupling"] == cifar["method_options"]["coupling"] == "encoder"
    assert imagenet["method_options"]["coupling"] == "independent"
    for recipe in (mnist, cifar, imagenet):
        assert recipe["method_options"]["tn"] == 16 and recipe["method_options"]["delta_mode"] == "uniform"
        assert recipe["train"]["grad_clip"] == 0.0


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_stage2_recipes_use_the_stage1_network(dataset):
    # The stage-2 student starts from the stage-1 weights: same backbone, same options, same φ.
    stage1 = tomllib.loads((RECIPES / f"cud-{dataset}.toml").read_text())
    stage2 = tomllib.loads((RECIPES / f"cud-stage2-{dataset}.toml").read_text())
    assert stage2["backbone"] == stage1["backbone"]
    assert stage2["backbone_options"] == stage1["backbone_options"]
    assert stage2["dataset"] == stage1["dataset"]
    options = stage2["method_options"]
    assert options["phase_indices"] == [8, 11, 14] and options["trajectory_steps"] == 16
    assert stage2["train"]["max_steps"] == 3 * options["steps_per_phase"]
    # the paper's stage-2 student has no Prior ShakeDrop; its teacher (the backbone above) has φ
    assert options["student_shakedrop"] == "off" and stage2["backbone_options"]["shakedrop"] is True
