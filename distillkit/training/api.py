"""``distillkit.train``: ``distillkit run`` from Python (notebooks), through the same
``start_run`` / ``launch`` and so the same validation; a bad option raises the one-line
``ConfigError`` the command line would print."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import attrs
import torch

from ..config import RunConfig, load_toml, nested_set, to_dict
from ..errors import ConfigError


def config_tree(config: RunConfig | Mapping[str, Any] | str | Path) -> dict:
    """The option tree of a ``RunConfig``, a dict (nested tables and/or dotted ``--set`` keys such
    as ``"train.lr"``), or a TOML file path."""
    if isinstance(config, RunConfig):
        return to_dict(config)
    if isinstance(config, (str, Path)):
        return load_toml(str(config))
    if not isinstance(config, Mapping):
        raise ConfigError("config", type(config).__name__, "a RunConfig, a dict of options or a TOML file path")
    tree: dict = {}

    def put(prefix: str, values: Mapping) -> None:
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                put(dotted + ".", value)
            else:
                nested_set(tree, dotted, dict(value) if isinstance(value, Mapping) else value)

    put("", config)
    return tree


@attrs.frozen
class TrainedRun:
    """A finished run: ``id`` (the MLflow run id; None when untracked), its folder, its final
    ``checkpoint``, ``metrics`` (the end-of-run evaluation: ``eval/<metric>/nfe<k>`` and
    ``eval/ode_error/nfe<k>``, the values of the table ``distillkit run`` prints), that ``table``,
    and the ``exports`` ``export=`` asked for."""

    id: Optional[str]
    output_dir: Path
    checkpoint: Path
    metrics: dict[str, float]
    table: str
    final_loss: float
    exports: tuple = ()

    def generator(self, nfe: int = 1, *, weights: str = "ema", device: str | torch.device = "cpu"):
        """The run's sampling function at ``nfe`` (``distillkit.export.Generator``)."""
        from ..export import generator_of
        from ..trained import load_trained_model

        return generator_of(load_trained_model(self.checkpoint, weights=weights, device=device), nfe,
                            weights=weights, run_id=self.id)

    def sample(self, n: int, nfe: int = 1, seed: int = 0, *, weights: str = "ema") -> torch.Tensor:
        """``n`` samples ``[n, *shape]`` (CPU) with the run's own sampler at ``nfe``: the same as
        ``distillkit sample --run <checkpoint> --nfe NFE --seed SEED``."""
        return self.generator(nfe, weights=weights).sample(n, seed)


def train(config: RunConfig | Mapping[str, Any] | str | Path, *, track: bool = True, progress: bool = False,
          export: str | tuple[str, ...] = (), export_nfe: Optional[int] = None) -> TrainedRun:
    """Train and evaluate a run, as ``distillkit run`` does, and return it.

    ``config``: a ``RunConfig``, a dict with the command line's keys (nested tables or dotted
    ``--set`` keys), or a TOML file path. ``track=False`` is ``--no-track``; ``export`` (formats,
    e.g. ``"torchscript,safetensors"``) and ``export_nfe`` are ``--export`` / ``--export-nfe``.
    Under ``torchrun`` only rank 0 gets the run; the other ranks get None.
    """
    from ..export import parse_formats
    from .launch import launch, start_run

    formats = parse_formats(export, "export") if export else ()
    start = start_run(config_tree(config))
    launched = launch(start, track=track, progress=progress, export=formats, export_nfe=export_nfe)
    result = launched.training
    if result is None:  # a rank of torchrun other than 0: rank 0 returns the run
        return None  # type: ignore[return-value]
    evaluation = result.evaluation
    return TrainedRun(id=result.run_id, output_dir=result.output_dir, checkpoint=result.checkpoint,
                      metrics=evaluation.metrics() if evaluation is not None else {},
                      table=evaluation.table() if evaluation is not None else "",
                      final_loss=result.final_loss, exports=tuple(launched.exports))
