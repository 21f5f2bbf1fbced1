"""What is evaluated: a model's sampling and velocity functions, its data, and the run it
belongs to (for the run's own sampler and grid, the protocol and the signatures)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs

from ..contracts import DataSpec, Dataset


def _memoized(make: Callable[[], Any]) -> Callable[[], Any]:
    """``make()`` called at most once: the dataset is built only by metrics that need real data."""
    made: list = []

    def get():
        if not made:
            made.append(make())
        return made[0]

    return get


@attrs.frozen
class Subject:
    """``model_for(cond)`` is the model's ``SamplingModel`` for a batch of labels and
    ``velocity_for(cond)`` its instantaneous velocity; both None for a check-only subject (a
    comparison checks its metrics before anything is trained). ``resolved`` is the run's resolved
    config: its ``sampler`` and ``grid`` are the run's own, its method the one samplers must suit."""

    resolved: Any  # distillkit.resolve.Resolved, or None for a bare velocity field
    spec: DataSpec
    dataset: Callable[[], Dataset]
    dataset_name: str
    sample: Any  # the run's SampleConfig: seeds, reference integrator and steps
    model_for: Optional[Callable] = None
    velocity_for: Optional[Callable] = None
    step: int = 0
    #: protocol entries saying where the weights came from (checkpoint, its sha256)
    record: dict = attrs.field(factory=dict)


def dataset_of(resolved, data_root: str = "") -> Callable[[], Dataset]:
    """The run's dataset, built on first use (``data_root`` overrides the run's)."""
    return _memoized(lambda: resolved.dataset_cls(resolved.dataset_config,
                                                  data_root or resolved.config.data_root or None))


def of_network(method, network, resolved, *, dataset: Optional[Dataset] = None, spec: Optional[DataSpec] = None,
               step: Optional[int] = None, data_root: str = "", record: Optional[dict] = None) -> Subject:
    """A network in eval mode as ``method`` samples it (``Method.sampling_model``)."""
    if dataset is None:
        make = dataset_of(resolved, data_root)
    else:
        def make(dataset=dataset):
            return dataset
    return Subject(
        resolved=resolved, spec=spec if spec is not None else make().spec, dataset=make,
        dataset_name=resolved.config.dataset, sample=resolved.config.sample,
        model_for=lambda cond: method.sampling_model(network, cond),
        velocity_for=lambda cond: method.velocity_fn(network, cond),
        step=resolved.config.train.max_steps if step is None else step, record=dict(record or {}),
    )


def of_trained(trained, *, data_root: str = "") -> Subject:
    """A ``distillkit.TrainedModel`` (``load_trained_model``) with the weights it was loaded with."""
    return of_network(trained.method, trained.model, trained.resolved, spec=trained.spec, step=trained.step,
                      data_root=data_root,
                      record={"checkpoint": str(trained.checkpoint), "checkpoint_sha256": trained.sha256})


def of_config(resolved, dataset: Dataset) -> Subject:
    """No model yet: only what can be checked before training (metrics for this data, references)."""
    return Subject(resolved=resolved, spec=dataset.spec, dataset=lambda: dataset, dataset_name=resolved.config.dataset,
                   sample=resolved.config.sample, step=resolved.config.train.max_steps)
