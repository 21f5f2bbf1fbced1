"""The MLflow form of a generator: a pyfunc model that answers ``{seed, n, labels}`` with samples.

Saved as a "model from code" (``pyfunc_model.py`` beside this module is the code MLflow runs;
nothing is pickled, so the default ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` setting loads it); its
one artifact is the generator's safetensors file, which ``load_generator`` reads. Serving needs
the environment that exported it (``mlflow models serve --env-manager local``).

A request is one object or a list of them (``{"inputs": {"seed": 0, "n": 4}}``, or
``{"dataframe_records": [{"seed": 0, "n": 4}]}``): ``n`` samples from seeds ``seed .. seed+n-1``,
the same as ``distillkit sample --seed SEED``; ``labels`` (class-conditional data: ``n`` integers)
defaults to the per-sample labels ``distillkit sample`` draws. The answer is the samples of all
requests in order, ``[sum n, *shape]``.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np

#: Samples one request may ask for (a served model should not be asked to allocate without limit).
MAX_SAMPLES = 4096
MODEL_NAME = "generator"
CODE = Path(__file__).with_name("pyfunc_model.py")


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from .formats import load_generator

        self.generator = load_generator(context.artifacts["generator"])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        outputs = [self._one(request) for request in requests_of(model_input)]
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.generator.spec.shape), np.float32)

    def _one(self, request: dict[str, Any]) -> np.ndarray:
        seed, n = int(request.get("seed", 0)), int(request.get("n", 1))
        if not 0 < n <= MAX_SAMPLES or seed < 0:
            raise ValueError(f"n must be in 1..{MAX_SAMPLES} and seed >= 0; got n={n}, seed={seed}")
        labels = request.get("labels")
        if labels is not None:
            import torch

            labels = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
        return self.generator.sample(n, seed, labels=labels).numpy()


def _plain(value):
    """numpy scalars and arrays (what MLflow makes of JSON) as Python values; NaN as absent."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def requests_of(model_input) -> list[dict[str, Any]]:
    """The requests in what MLflow hands ``predict``: a DataFrame (one request a row), a dict of
    one request, or a list of dicts."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, list):
        rows = list(model_input)
    else:
        raise ValueError(f"expected {{seed, n, labels}} or a list of them; got {type(model_input).__name__}")
    requests = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"a request is an object {{seed, n, labels}}; got {type(row).__name__}")
        requests.append({key: _plain(value) for key, value in row.items()})
    return requests


def signature(generator):
    """Requests of {seed, n, labels (optional, a list of integers)}; answers [sum n, *shape] floats."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", "seed", required=False), ColSpec("long", "n", required=False),
                     ColSpec(Array("long"), "labels", required=False)])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *generator.spec.shape))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """What the model needs, pinned to this environment. Given explicitly: MLflow would otherwise
    infer them by loading the model in a subprocess (slow, and noisy)."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("distillkit", "torch", "safetensors", "mlflow", "numpy", "pandas")]


def _kwargs(weights: Path, generator) -> dict[str, Any]:
    return {"python_model": str(CODE), "artifacts": {"generator": str(weights)}, "signature": signature(generator),
            "pip_requirements": requirements(),
            "metadata": {"distillkit": {"nfe": generator.nfe, "sampler": generator.sampler.describe(),
                                        "shape": list(generator.spec.shape),
                                        "num_classes": generator.spec.num_classes}}}


def _quiet() -> None:
    """No artifact progress bars in a command's output."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def save_pyfunc(path: Path, weights: Path, generator) -> None:
    _quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "no input example": the signature is explicit
        mlflow.pyfunc.save_model(path=str(path), **_kwargs(weights, generator))


@contextlib.contextmanager
def _reopened(run_id: str, tracking_uri: str) -> Iterator[None]:
    """The finished run ``run_id`` active again for the fluent API, then put back as it was
    (status, end time, and the process's tracking URI)."""
    import os

    from mlflow.tracking import MlflowClient

    # set_tracking_uri also exports MLFLOW_TRACKING_URI; both are put back (None unsets them), so
    # that a later command in this process resolves its own store again.
    previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    info = client.get_run(run_id).info
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        if info.status != "RUNNING":
            client.set_terminated(run_id, status=info.status, end_time=info.end_time)
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def log_pyfunc(weights: Path, generator, *, run_id: str, tracking_uri: str) -> str:
    """Log the model to ``run_id`` (MLflow lists it under the run's "Logged models"); its model id."""
    _quiet()
    with _reopened(run_id, tracking_uri), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(name=f"{MODEL_NAME}-nfe{generator.nfe}", **_kwargs(weights, generator))
    return info.model_id
