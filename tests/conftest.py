import os

import pytest

# Tests never read the developer's MLflow server or plugin selection.
for variable in ("MLFLOW_TRACKING_URI", "DISTILLKIT_LOAD_PLUGINS", "DISTILLKIT_DISABLE_PLUGINS"):
    os.environ.pop(variable, None)


@pytest.fixture
def registries():
    import distillkit

    return distillkit.get_registries()


@pytest.fixture(scope="session")
def cud_rk2_toy2d_checkpoint(tmp_path_factory):
    """A 3-step CUD-RK2 run on toy2d (a stage-1 teacher, a checkpoint to rebuild), trained once."""
    from distillkit.cli.main import main

    runs = tmp_path_factory.mktemp("cud-rk2-toy2d")
    assert main(["run", "--method", "cud", "--integrator", "rk2", "--dataset", "toy2d", "--max-steps", "3",
                 "--batch-size", "16", "--runs-dir", str(runs), "--no-track", "--quiet",
                 "--set", "sample.num_samples=32", "--set", "sample.reference_steps=2", "--nfe", "1"]) == 0
    return next(runs.glob("runs/*/checkpoint.pt"))


def pytest_configure(config):
    # Two pytest-xdist workers on a 2-core machine: one intra-op thread each. With more, OpenMP
    # threads of the two workers spin against each other and small ops slow down by 100x.
    import torch

    torch.set_num_threads(1)
    # The command line's own default (one core spare) yields to the environment: commands run
    # in-process and child processes keep this one thread.
    os.environ["OMP_NUM_THREADS"] = "1"
