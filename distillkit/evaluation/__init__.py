"""Evaluation as a library: one evaluator for the end of every run, ``distillkit eval``,
``distillkit compare`` and the benchmarks.

- ``settings``: what is measured and how it is sampled (``EvalSettings``, ``default_metrics``);
- ``subject``: what is evaluated (a trained run, a network and its method);
- ``choice``: the sampler and time grid, checked against the method and the NFEs;
- ``evaluator``: ``Evaluator.check()`` (everything that can fail, before any sample) and ``run()``;
- ``results``: values, the protocol, signatures and MLflow tags (``EvalResult``);
- ``runs``: finding a trained run, logging an evaluation back to it;
- ``end_of_run``: what the trainer calls (``end_of_run``, ``sample_grid``);
- ``figures``: sample figures, PNG grids and .npz files.
"""

from ..files import write_atomic
from ..sampling import sample_seeded
from .cache import cache_dir
from .choice import SamplingChoice, choose_sampling, draw
from .end_of_run import Evaluation, NfeResult, end_of_run, evaluate, sample_grid
from .evaluator import Evaluator, build_metric, evaluate_model
from .figures import image_grid, save_npz, save_png, save_sample_figure, to_uint8
from .labels import class_labels, labels_for
from .results import EvalResult, base_signature, measured_nfes, signature_tags
from .runs import OpenedRun, check_run_in_store, log_evaluation, open_run, store_exists
from .settings import EvalSettings, default_metrics, distribution_metric
from .subject import Subject, of_config, of_network, of_trained

__all__ = [
    "EvalResult", "EvalSettings", "Evaluation", "Evaluator", "NfeResult", "OpenedRun", "SamplingChoice", "Subject",
    "base_signature", "build_metric", "cache_dir", "check_run_in_store", "choose_sampling", "class_labels",
    "default_metrics", "distribution_metric", "draw", "end_of_run", "evaluate", "evaluate_model", "image_grid",
    "labels_for", "log_evaluation", "measured_nfes", "of_config", "of_network", "of_trained", "open_run",
    "sample_grid", "sample_seeded", "save_npz", "save_png", "save_sample_figure", "signature_tags", "store_exists",
    "to_uint8", "write_atomic",
]
