import os

import pytest

# Tests never read the developer's MLflow server or plugin selection.
for variable in ("MLFLOW_TRACKING_URI", "DISTILLKIT_LOAD_PLUGINS", "DISTILLKIT_DISABLE_PLUGINS"):
    os.environ.pop(variable, None)


@pytest.fixture
def registries():
    import distillkit

    return distillkit.get_registries()


def pytest_configure(config):
    # Two pytest-xdist workers on a 2-core machine: one intra-op thread each. With more, OpenMP
    # threads of the two workers spin against each other and small ops slow down by 100x.
    import torch

    torch.set_num_threads(1)
