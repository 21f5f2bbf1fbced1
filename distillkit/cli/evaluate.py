"""``distillkit eval``: a trained run's quality per NFE, logged back to the run with its protocol.

The functions here are also what ``distillkit sample`` and ``distillkit compare`` use: finding a
run's checkpoint (``open_run``), the options every command that samples a trained model shares
(``add_model_options``), and the evaluation itself (``evaluate_model``, ``log_evaluation``).

Metric names in MLflow are ``eval/<metric>/nfe<k>`` (MLflow refuses ``@`` in metric names). With a
non-default sampler, grid or weights the prefix names them: ``eval-heun/...``, ``eval-online/...``,
``eval-heun-edm-online/...``, so different protocols never overwrite each other.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import attrs
import torch

from ..errors import ConfigError, UsageError

#: Every metric ``eval`` knows, in the order tables show them.
METRICS = ("fd_pixels", "energy", "classifier_fd", "fid", "ode_error")
METRIC_HELP = {
    "fd_pixels": "Fréchet distance of Gaussians fitted to generated and real pixels (images)",
    "energy": "energy distance to real samples, no features (any data; the toy2d default)",
    "classifier_fd": "Fréchet distance in the features of a small classifier distillkit trains (digits, mnist, fashion-mnist)",
    "fid": "FID: clean-fid's Inception features against statistics made by distillkit fid-stats",
    "ode_error": "RMS distance to a high-accuracy solve from the same noise (the model's own, or --teacher's)",
}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_DEFAULT_BATCH = 500


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# parsing


def parse_nfe(text: str, option: str = "--nfe") -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise ConfigError(option, text, "one or more positive integers, comma-separated (e.g. 1,2,4,8)")
    return tuple(dict.fromkeys(values))


def parse_metrics(text: str, option: str = "--metric") -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    unknown = [name for name in names if name not in METRICS]
    if not names or unknown:
        raise ConfigError(option, unknown[0] if unknown else text, "one or more of " + ", ".join(METRICS))
    return names


def parse_positive(text: str, option: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise ConfigError(option, text, "a positive integer")
    return value


def parse_grid(text: str, default: str) -> str:
    if not text:
        return default
    if text not in ("uniform", "edm"):
        raise ConfigError("--grid", text, "uniform or edm")
    return text


def add_model_options(parser: argparse.ArgumentParser, *, n_default: str) -> None:
    """The options of every command that samples a trained run (``sample``, ``eval``)."""
    parser.add_argument("--run", required=True, metavar="RUN",
                        help="an MLflow run id, a run folder name under RUNS_DIR/runs, or a checkpoint file")
    parser.add_argument("--weights", default="ema", metavar="WEIGHTS",
                        help="ema (the run's default EMA), online, or the name of one of its EMAs (default: ema)")
    parser.add_argument("--integrator", default="", metavar="NAME",
                        help="sampling integrator (default: the run's sample.integrator)")
    parser.add_argument("--grid", default="", metavar="GRID",
                        help="time grid: uniform or edm (default: the run's sample.grid)")
    parser.add_argument("--n", default="", metavar="N", help=f"samples per NFE (default: {n_default})")
    parser.add_argument("--seed", default="", metavar="S",
                        help="first per-sample seed: sample i uses seed S + i (default: the run's sample.seed)")
    parser.add_argument("--batch-size", default=str(_DEFAULT_BATCH), metavar="B",
                        help=f"samples per network batch; results do not depend on it (default: {_DEFAULT_BATCH})")
    parser.add_argument("--runs-dir", default="distillkit-runs", metavar="DIR",
                        help="the runs directory the run was trained in (default: distillkit-runs)")
    parser.add_argument("--tracking-uri", default="", metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")


# --------------------------------------------------------------------------------------------
# finding a run


@attrs.frozen
class OpenedRun:
    trained: object  # distillkit.trained.TrainedModel
    run_id: Optional[str]
    tracking_uri: str
    runs_dir: Path
    device: torch.device


def _sqlite_file(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def store_exists(uri: str) -> bool:
    """False for an SQLite store whose file is missing (opening it would create an empty one)."""
    path = _sqlite_file(uri)
    return path is None or path.is_file()


def check_device(name: str) -> torch.device:
    import types

    from ..config import _device  # the RunConfig validator: one vocabulary for --device everywhere
    from .run import check_device_available

    _device(None, types.SimpleNamespace(name="--device"), name)
    return check_device_available(name)


def open_run(reference: str, *, runs_dir: str, tracking_uri: str, weights: str, device: str) -> OpenedRun:
    """Load a run's network: ``reference`` is a checkpoint file, a folder name under
    ``<runs_dir>/runs`` (tracked or ``--no-track`` runs), or an MLflow run id whose checkpoint is
    then read from the run's artifacts. One-line ``UsageError`` when it is none of these."""
    from ..tracking import resolve_tracking_uri
    from ..trained import find_checkpoint, load_trained_model
    from ..training.checkpoint import load_checkpoint

    torch_device = check_device(device)
    root = Path(runs_dir).expanduser().resolve()
    uri = resolve_tracking_uri(tracking_uri, root)
    file = Path(reference).expanduser()
    local = root / "runs" / reference / "checkpoint.pt"
    run_id: Optional[str] = reference if _RUN_ID.match(reference) else None
    if file.is_file():
        path = file.resolve()
        run_id = load_checkpoint(path).get("run_id")
    elif reference and "/" not in reference and local.is_file():
        path = local
    elif run_id is not None:
        if not store_exists(uri):
            raise UsageError(f"--run={reference}: no run folder {root / 'runs' / reference} and no MLflow store at "
                             f"{_sqlite_file(uri)} (pass the run's --runs-dir or --tracking-uri)")
        found = find_checkpoint(reference, runs_dir=root, tracking_uri=uri)
        assert found is not None
        path = found[0]
    else:
        raise UsageError(f"--run={reference!r}: not a checkpoint file, not a run folder under {root / 'runs'}, "
                         f"and not an MLflow run id")
    trained = load_trained_model(path, weights=weights, device=torch_device)
    return OpenedRun(trained, run_id, uri, root, torch_device)


# --------------------------------------------------------------------------------------------
# the evaluation


@attrs.frozen
class EvalSettings:
    metrics: tuple[str, ...]
    nfes: tuple[int, ...]
    n: int
    seed: int
    integrator: str
    grid: str
    weights: str = "ema"
    batch_size: int = _DEFAULT_BATCH
    teacher: str = ""
    inception_weights: str = ""
    data_root: str = ""


def default_metrics(spec, dataset: str) -> tuple[str, ...]:
    """What ``eval`` and ``compare`` measure unless ``--metric`` says otherwise: the end-of-run
    metric, the classifier distance where distillkit has a classifier for the data, the ODE error."""
    from .. import classifier

    if spec.is_image:
        extra = ("classifier_fd",) if classifier.supported(dataset) else ()
        return ("fd_pixels", *extra, "ode_error")
    return ("energy", "ode_error")


def settings_from_args(args: argparse.Namespace, trained, metrics: tuple[str, ...], nfes: tuple[int, ...],
                       *, n_default: int) -> EvalSettings:
    sample = trained.resolved.config.sample
    return EvalSettings(
        metrics=metrics, nfes=nfes,
        n=parse_positive(args.n, "--n") if args.n else n_default,
        seed=_non_negative(args.seed, "--seed") if args.seed != "" else sample.seed,
        integrator=args.integrator or sample.integrator,
        grid=parse_grid(args.grid, sample.grid),
        weights=args.weights,
        batch_size=parse_positive(args.batch_size, "--batch-size"),
        teacher=getattr(args, "teacher", "") or "",
        inception_weights=getattr(args, "inception_weights", "") or "",
        data_root=getattr(args, "data_root", "") or "",
    )


def _non_negative(text: str, option: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = -1
    if value < 0:
        raise ConfigError(option, text, "an integer >= 0")
    return value


def metric_prefix(trained, settings: EvalSettings, tableau) -> str:
    """``eval`` for the run's own sampler, grid and default EMA; otherwise the differences are
    named in it (``eval-heun``, ``eval-online``, ``eval-rk3-edm-ema_0.9999``)."""
    from ..plugin_manager import get_registries

    sample = trained.resolved.config.sample
    own = get_registries().integrators.get(sample.integrator)
    parts = ["eval"]
    if tableau.name != own.name:
        parts.append(tableau.name)
    if settings.grid != sample.grid:
        parts.append(settings.grid)
    if settings.weights != "ema":
        parts.append(settings.weights)
    return "-".join(parts)


def signatures(settings: EvalSettings, *, step: int, sampler: str, classifier=None, fid_stats=None,
               ode_reference: str = "") -> dict[str, str]:
    """metric name -> what must be equal for two measurements of it to be the same measurement
    (sample count, seeds, sampler, weights, checkpoint step, and the metric's reference).
    ``ode_reference``: ``own:<integrator>x<steps>`` or ``<teacher identity>:<integrator>x<steps>``."""
    base = f"n={settings.n} seed={settings.seed} sampler={sampler}/{settings.grid} weights={settings.weights} step={step}"
    out = {}
    for metric in settings.metrics:
        if metric in ("fd_pixels", "energy"):
            out[metric] = base
        elif metric == "classifier_fd" and classifier is not None:
            out[metric] = f"{base} classifier={classifier.path.name}"
        elif metric == "fid" and fid_stats is not None:
            out[metric] = f"{base} stats={fid_stats.path.name}:{fid_stats.n}"
        elif metric == "ode_error" and ode_reference:
            name = "ode_error" if ode_reference.startswith("own:") else "ode_error_teacher"
            out[name] = f"{base} ref={ode_reference}"
    return out


def measured_nfes(tag_value: Optional[str], signature: str) -> set[int]:
    """The NFEs a run's ``distillkit.eval.<metric>`` tag says were measured with this signature."""
    if not signature or not tag_value or not tag_value.startswith(f"{signature} nfe="):
        return set()
    return {int(k) for k in tag_value[len(signature) + len(" nfe="):].split(",") if k.strip().isdigit()}


@attrs.frozen
class EvalResult:
    prefix: str
    values: dict  # metric name -> {nfe: value}
    steps: dict  # nfe -> integrator steps
    seconds: dict  # nfe -> seconds spent sampling
    protocol: dict
    signatures: dict  # metric name -> signature string

    def metrics(self) -> dict[str, float]:
        return {f"{self.prefix}/{metric}/nfe{nfe}": value
                for metric, by_nfe in self.values.items() for nfe, value in by_nfe.items()}

    def tags(self, existing: Optional[dict] = None) -> dict[str, str]:
        """``distillkit.<prefix>.<metric>``: the metric's signature and the NFEs measured under it
        (merged with the NFEs an earlier measurement of the same signature logged)."""
        tags = {}
        for metric, signature in self.signatures.items():
            key = f"distillkit.{self.prefix}.{metric}"
            nfes = set(self.steps) | measured_nfes((existing or {}).get(key), signature)
            tags[key] = f"{signature} nfe={','.join(str(k) for k in sorted(nfes))}"
        return tags

    def protocol_artifacts(self) -> dict[str, str]:
        """metric -> artifact path of its protocol: one file per metric, so measuring another
        metric later never replaces the record of how this one was measured."""
        return {metric: f"eval/{self.prefix}-{metric}.json" for metric in self.values}

    def metric_protocol(self, metric: str) -> dict:
        """The protocol with only this metric's reference and results."""
        keys = {f"{self.prefix}/{metric}/nfe{k}" for k in self.steps}
        return {**self.protocol, "metrics": {metric: self.protocol["metrics"][metric]},
                "results": {k: v for k, v in self.protocol["results"].items() if k in keys}}

    def table(self) -> str:
        names = list(self.values)
        width = max([12, *(len(n) + 1 for n in names)])
        lines = [f"{'NFE':>5} {'steps':>6} " + " ".join(f"{n:>{width}}" for n in names) + f" {'seconds':>8}"]
        for nfe, steps in self.steps.items():
            cells = " ".join(f"{self.values[n][nfe]:>{width}.4f}" for n in names)
            lines.append(f"{nfe:>5} {steps:>6} {cells} {self.seconds[nfe]:>8.2f}")
        return "\n".join(lines)


def _check_applicable(trained, settings: EvalSettings, tableau) -> None:
    from .. import classifier
    from ..sampling import steps_for_nfe

    config = trained.resolved.config
    for metric in settings.metrics:
        if metric in ("fd_pixels", "fid", "classifier_fd") and not trained.spec.is_image:
            raise ConfigError("--metric", metric, f"a metric for this data: {config.dataset} samples have shape "
                              f"{trained.spec.shape}, not images (use energy, ode_error)")
        if metric == "classifier_fd" and not classifier.supported(config.dataset):
            raise ConfigError("--metric", metric, f"a metric for dataset {config.dataset}: distillkit has a classifier "
                              f"for {', '.join(classifier.RECIPES)} only (use fid or fd_pixels)")
    for nfe in settings.nfes:
        try:
            steps_for_nfe(tableau, nfe)
        except ValueError:
            raise ConfigError("--nfe", nfe, f"{tableau.name} spends {tableau.stages} network evaluations per step; "
                              f"choose multiples of {tableau.stages}") from None


def prepare_fid(dataset: str, inception_weights: str, device, extractor=None):
    """(extractor, reference statistics) for FID on ``dataset``, or a one-line error saying what
    is missing (weights, or the statistics ``distillkit fid-stats`` makes)."""
    from .. import fid

    extractor = extractor or fid.inception_extractor(inception_weights, device)
    stats = fid.load_reference_stats(dataset, extractor.name)
    if stats is None:
        raise UsageError(
            f"no FID reference statistics for dataset {dataset} with feature extractor {extractor.name} in "
            f"{fid.stats_path(dataset, extractor.name).parent}: run `distillkit fid-stats --dataset {dataset}` first"
        )
    return extractor, stats


def evaluate_model(
    trained,
    settings: EvalSettings,
    *,
    device: torch.device,
    runs_dir: Path,
    tracking_uri: str = "",
    run_id: Optional[str] = None,
    fid_extractor=None,
    fid_state=None,
    classifier=None,
    log: Callable[[str], None] = _log,
) -> EvalResult:
    """Sample ``settings.n`` images per NFE from per-sample seeds and measure each metric.

    Everything that can fail (metric for this data, NFE for this integrator, FID weights and
    statistics, classifier data, teacher) is checked before the first sample is drawn.
    ``fid_extractor``: a ``distillkit.fid.FeatureExtractor`` to use instead of Inception (tests);
    ``fid_state`` / ``classifier``: references already prepared (``compare`` prepares them once).
    """
    import distillkit

    from .. import classifier as classifier_mod
    from .. import fid as fid_mod
    from ..contracts import TeacherContext
    from ..evaluation import class_labels, sample_seeded
    from ..integrators.grids import uniform_grid
    from ..metrics import energy_distance, frechet_distance, ode_error
    from ..plugin_manager import get_registries
    from ..resolve import lookup
    from ..sampling import sampling_grid, steps_for_nfe
    from ..teachers import load_teacher

    resolved = trained.resolved
    config = resolved.config
    registries = get_registries()
    tableau = lookup(registries.integrators, "--integrator", settings.integrator)
    _check_applicable(trained, settings, tableau)
    metrics = settings.metrics
    prefix = metric_prefix(trained, settings, tableau)
    spec = trained.spec
    step = trained.step
    sampler = tableau.name

    # References, checked before any sampling.
    if "fid" not in metrics:
        fid_state = None
    elif fid_state is None:
        fid_state = prepare_fid(config.dataset, settings.inception_weights, device, fid_extractor)
    need_real = any(m in metrics for m in ("fd_pixels", "energy", "classifier_fd"))
    dataset = None
    if need_real:
        dataset = resolved.dataset_cls(resolved.dataset_config, settings.data_root or config.data_root or None)
    if "classifier_fd" not in metrics:
        classifier = None
    elif classifier is None:
        classifier = classifier_mod.classifier_for(config.dataset, data_root=settings.data_root or config.data_root,
                                                   dataset_options=config.dataset_options, log=log)
    teacher = None
    if "ode_error" in metrics and settings.teacher:
        context = TeacherContext(data=spec, dataset_name=config.dataset, dataset_config=resolved.dataset_config,
                                 device=device, runs_dir=str(runs_dir), tracking_uri=tracking_uri)
        teacher = load_teacher(settings.teacher, registries, context)

    log(f"distillkit: evaluating {config.method} on {config.dataset} (step {step}, {settings.weights} weights, "
        f"{sampler} sampler) at NFE {','.join(map(str, settings.nfes))} with {settings.n} samples: {', '.join(metrics)}")
    labels = class_labels(settings.n, spec.num_classes, settings.seed) if spec.num_classes else None
    real = dataset.reference_samples(settings.n, torch.Generator().manual_seed(settings.seed)) if dataset else None
    details: dict[str, dict] = {}
    real_rule = (f"{len(real) if real is not None else 0} distinct training images of {config.dataset}: "
                 f"dataset.reference_samples(n, torch.Generator().manual_seed({settings.seed}))")
    for metric in ("fd_pixels", "energy"):
        if metric in metrics:
            details[metric] = {"reference": real_rule, "n_reference": len(real)}
    reference_features = None
    if classifier is not None:
        reference_features = classifier.features(real)
        details["classifier_fd"] = {"reference": real_rule, "n_reference": len(real), "classifier": classifier.path.name,
                                    "classifier_holdout_accuracy": classifier.holdout_accuracy,
                                    "features": f"{classifier_mod.FEATURE_DIM}-d penultimate layer"}
    if fid_state is not None:
        extractor, stats = fid_state
        details["fid"] = {"feature_extractor": extractor.name, "weights_file": extractor.weights_file,
                          "statistics": str(stats.path), "reference": stats.meta}
    ode_name = "ode_error_teacher" if teacher is not None else "ode_error"
    reference_samples = None
    ode_reference = ""
    if "ode_error" in metrics:
        ref_integrator = registries.integrators.get(config.sample.reference_integrator)
        ref_steps = config.sample.reference_steps
        if teacher is not None:
            def ref_velocity(cond):
                return lambda x, t: teacher.velocity(x, t, cond)
            what = f"teacher {teacher.identity}"
        else:
            ref_velocity = trained.velocity_fn
            what = "the model's own velocity"
        started = time.perf_counter()
        reference_samples = sample_seeded(ref_velocity, spec, settings.n, settings.seed, uniform_grid(ref_steps),
                                          ref_integrator, batch_size=settings.batch_size, device=device, labels=labels)
        details[ode_name] = {
            "reference": f"{what} integrated with {ref_integrator.name}, {ref_steps} uniform steps, from the same noise"
                         + (" and labels" if labels is not None else ""),
            "distance": "RMS over samples of the per-sample Euclidean distance / sqrt(dimension)",
            "seconds": round(time.perf_counter() - started, 3),
        }
        ode_reference = f"{teacher.identity if teacher else 'own'}:{ref_integrator.name}x{ref_steps}"

    order = [m for m in ("fd_pixels", "energy", "classifier_fd", "fid") if m in metrics]
    if "ode_error" in metrics:
        order.append(ode_name)
    values: dict[str, dict[int, float]] = {name: {} for name in order}
    steps_by_nfe: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for nfe in settings.nfes:
        steps = steps_for_nfe(tableau, nfe)
        started = time.perf_counter()
        generated = sample_seeded(trained.velocity_fn, spec, settings.n, settings.seed, sampling_grid(settings.grid, steps),
                                  tableau, batch_size=settings.batch_size, device=device, labels=labels)
        seconds[nfe] = time.perf_counter() - started
        steps_by_nfe[nfe] = steps
        if "fd_pixels" in values:
            values["fd_pixels"][nfe] = frechet_distance(generated, real)
        if "energy" in values:
            values["energy"][nfe] = energy_distance(generated, real)
        if "classifier_fd" in values:
            values["classifier_fd"][nfe] = classifier_mod.classifier_fd(generated, reference_features, classifier)
        if "fid" in values:
            values["fid"][nfe] = fid_mod.fid(generated, fid_state[1], fid_state[0], batch_size=min(settings.batch_size, 64))
        if ode_name in values:
            values[ode_name][nfe] = ode_error(generated, reference_samples)
        log(f"  NFE {nfe}: " + ", ".join(f"{name} {values[name][nfe]:.4f}" for name in order)
            + f" ({seconds[nfe]:.1f}s sampling)")

    protocol = {
        "run_id": run_id,
        "checkpoint": str(trained.checkpoint),
        "checkpoint_sha256": trained.sha256,
        "step": step,
        "method": config.method,
        "training_integrator": config.integrator,
        "dataset": config.dataset,
        "weights": settings.weights,
        "sampler": {"integrator": tableau.name, "stages": tableau.stages, "grid": settings.grid},
        "nfe": list(settings.nfes),
        "steps": {str(k): v for k, v in steps_by_nfe.items()},
        "n": settings.n,
        "seeds": {"first": settings.seed, "last": settings.seed + settings.n - 1,
                  "rule": "sample i starts from distillkit.sampling.prior_noise with seed (first + i)"},
        "labels": (f"uniform over {spec.num_classes} classes; label i drawn from its own generator seeded from "
                   f"first + i (distillkit.evaluation.class_labels)") if labels is not None else None,
        "batch_size": settings.batch_size,
        "device": str(device),
        "metrics": {name: {"description": METRIC_HELP["ode_error" if name == "ode_error_teacher" else name],
                           **details.get(name, {})} for name in order},
        "metric_keys": f"{prefix}/<metric>/nfe<k>",
        "results": {f"{prefix}/{m}/nfe{k}": v for m, by in values.items() for k, v in by.items()},
        "sampling_seconds": {str(k): round(v, 3) for k, v in seconds.items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "distillkit_version": distillkit.__version__,
        "torch_version": torch.__version__,
    }
    signed = signatures(settings, step=step, sampler=sampler, classifier=classifier,
                        fid_stats=fid_state[1] if fid_state else None, ode_reference=ode_reference)
    return EvalResult(prefix, values, steps_by_nfe, seconds, protocol, signed)


def log_evaluation(result: EvalResult, run_id: str, tracking_uri: str, step: int) -> None:
    """Log metrics, protocol artifact and tags to the existing run ``run_id``, without touching
    its params; its status and end time are put back as they were."""
    from mlflow.tracking import MlflowClient

    from ..tracking import MlflowTracker

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    info = run.info
    tracker = MlflowTracker(tracking_uri, "unused-on-reattach", Path("."), run_id=run_id)
    try:
        tracker.log_metrics(result.metrics(), step=step)
        with tempfile.TemporaryDirectory(prefix="distillkit-eval-") as scratch:
            for metric, artifact in result.protocol_artifacts().items():
                path = Path(scratch) / Path(artifact).name
                path.write_text(json.dumps(result.metric_protocol(metric), indent=2, default=str) + "\n")
                tracker.log_artifact(path, str(Path(artifact).parent))
        tracker.set_tags(result.tags(run.data.tags))
    finally:
        if info.status != "RUNNING":
            client.set_terminated(run_id, status=info.status, end_time=info.end_time)


def check_run_in_store(run_id: Optional[str], tracking_uri: str, reference: str) -> None:
    """Fail before any work when the results could not be logged to the run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if run_id is None:
        raise UsageError(f"--run={reference}: this checkpoint belongs to no MLflow run (trained with --no-track); "
                         f"add --no-log to evaluate it without logging")
    if not store_exists(tracking_uri):
        raise UsageError(f"run {run_id}: no MLflow store at {_sqlite_file(tracking_uri)}; pass the run's --runs-dir "
                         f"or --tracking-uri, or --no-log")
    try:
        MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"run {run_id} cannot be read from {tracking_uri}: {first}; pass --no-log to evaluate "
                         f"without logging") from None


# --------------------------------------------------------------------------------------------
# the command


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure a trained run's quality per NFE and log it to the run",
        description="Sample a trained run at several NFEs from per-sample seeds, measure quality, and log "
                    "eval/<metric>/nfe<k> with the protocol (a JSON artifact and tags) to the same MLflow run.",
    )
    add_model_options(parser, n_default="the run's sample.num_samples")
    parser.add_argument("--nfe", default="1,2,4,8,16", metavar="LIST", help="network evaluations per sample (default: 1,2,4,8,16)")
    parser.add_argument("--metric", "--metrics", dest="metric", default="", metavar="LIST",
                        help="comma-separated: " + ", ".join(METRICS) + " (default: fd_pixels or energy, "
                             "classifier_fd where available, ode_error)")
    parser.add_argument("--teacher", default="", metavar="TEACHER",
                        help="ode_error against this teacher's solve (run id, checkpoint, teacher name) instead of "
                             "the model's own; logged as ode_error_teacher")
    parser.add_argument("--inception-weights", default="", metavar="FILE",
                        help="FID: the TorchScript Inception file (default: $DISTILLKIT_INCEPTION_WEIGHTS, else "
                             "clean-fid's download)")
    parser.add_argument("--data-root", default="", metavar="DIR", help="dataset files (default: the run's data_root)")
    parser.add_argument("--json", action="store_true", help="print the results and protocol as JSON")
    parser.add_argument("--no-log", action="store_true", help="do not log to the MLflow run")


def command(args: argparse.Namespace) -> int:
    nfes = parse_nfe(args.nfe)
    requested = parse_metrics(args.metric) if args.metric else None
    opened = open_run(args.run, runs_dir=args.runs_dir, tracking_uri=args.tracking_uri, weights=args.weights,
                      device=args.device)
    trained = opened.trained
    if not args.no_log:
        check_run_in_store(opened.run_id, opened.tracking_uri, args.run)
    metrics = requested or default_metrics(trained.spec, trained.resolved.config.dataset)
    settings = settings_from_args(args, trained, metrics, nfes, n_default=trained.resolved.config.sample.num_samples)
    result = evaluate_model(trained, settings, device=opened.device, runs_dir=opened.runs_dir,
                            tracking_uri=opened.tracking_uri, run_id=opened.run_id)
    logged = False
    if not args.no_log and opened.run_id:
        log_evaluation(result, opened.run_id, opened.tracking_uri, trained.step)
        logged = True
    if args.json:
        print(json.dumps({"run_id": opened.run_id, "logged": logged, "metrics": result.metrics(),
                          "protocol": result.protocol}, indent=2, default=str))
        return 0
    sampler = result.protocol["sampler"]
    print(f"quality per NFE ({sampler['integrator']} sampler, {sampler['grid']} grid, {settings.n} samples from seeds "
          f"{settings.seed}..{settings.seed + settings.n - 1}, {settings.weights} weights, step {trained.step}):")
    print(result.table())
    if logged:
        print(f"logged to MLflow run {opened.run_id} as {result.prefix}/<metric>/nfe<k>, protocols in "
              f"{', '.join(result.protocol_artifacts().values())}")
    return 0
