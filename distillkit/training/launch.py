"""Starting, resuming and finishing one tracked training run: what ``distillkit run`` does between
parsing its flags and printing its report.

``start_run`` resolves the configuration (for ``--resume RUN``: the checkpoint's, with only the
``RESUMABLE`` options taken from the command line); ``resume_newest`` finds the checkpoint
``--resume auto`` continues; ``launch`` checks the device, the tracking server, the data, the
teacher and the runs directory before anything is created, then opens the MLflow run, trains
(one process or one rank of ``torchrun``) and ends the run as FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import attrs

from ..config import RunConfig, default_runs_dir, flatten, run_config_from_dict
from ..errors import ConfigError
from ..resolve import Resolved, resolve

#: Options that may differ when a run is resumed: where and how it runs, not what it trains.
RESUMABLE = {
    "runs_dir", "tracking_uri", "device", "experiment", "data_root",
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes", "train.keep_last",
    "train.keep_every", "train.sample_every", "train.checkpoint_format", "train.nonfinite_check",
}


def config_identity(resolved_tree: dict) -> str:
    """A hash of what a run trains (not where it runs): ``--resume auto`` matches runs by it."""
    what = {k: v for k, v in flatten(resolved_tree).items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_resume(reference: str, runs_dir: Path, identity: str) -> Optional[Path]:
    """The checkpoint to resume: a file, a run id / run folder name, or ``auto`` (the newest
    checkpoint under ``runs_dir`` of a run whose config has ``identity``; None if there is none)."""
    if reference == "auto":
        from .checkpoint import RESUME_KEYS, load_checkpoint, require_keys

        candidates = sorted((runs_dir / "runs").glob("*/checkpoint.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:  # newest first: a finished run of this config is returned too
            payload = load_checkpoint(path)
            require_keys(payload, path, RESUME_KEYS, "--resume auto")
            if config_identity(payload["config"]) == identity:
                return path
        return None
    path = Path(reference).expanduser()
    if path.is_file():
        return path
    local = runs_dir / "runs" / reference / "checkpoint.pt"
    if local.is_file():
        return local
    raise ConfigError("--resume", reference, f"a checkpoint file, a run id with a checkpoint under {runs_dir / 'runs'}, or auto")


def resumed_config(payload: dict, tree: dict) -> RunConfig:
    """The checkpoint's config, with only the RESUMABLE options taken from the command line."""
    given = flatten(tree)
    changed = sorted(k for k in given if k not in RESUMABLE)
    if changed:
        raise ConfigError("--resume", changed[0], "only where and how long a run runs may change on resume: "
                          + ", ".join(sorted(RESUMABLE)))
    base = payload["config"]
    for key, value in given.items():
        section, _, leaf = key.rpartition(".")
        (base[section] if section else base)[leaf] = value
    return run_config_from_dict(base)


@attrs.frozen
class RunStart:
    """A resolved run and, when it continues an earlier one, the checkpoint it resumes from.
    ``finished``: the checkpoint ``--resume auto`` found is of a run that already finished (its
    payload is then not loaded: nothing is trained again)."""

    resolved: Resolved
    resume_path: Optional[Path] = None
    resume_payload: Optional[dict[str, Any]] = None
    finished: bool = False
    #: run folders of this config that died before their first checkpoint (``--resume auto``
    #: supersedes them: ``orphans.supersede``)
    orphans: tuple = ()


def start_run(tree: dict, resume: Optional[str] = None) -> RunStart:
    """The run the option ``tree`` describes. ``resume``: a checkpoint file or a run id / run folder
    name to continue (its config, with the RESUMABLE options of ``tree``); ``auto`` is looked up
    later by ``resume_newest``, so that a dry run reads no checkpoint."""
    from ..plugin_manager import get_registries

    if resume and resume != "auto":
        from .checkpoint import RESUME_KEYS, load_checkpoint, require_keys

        runs_dir = default_runs_dir(run_config_from_dict({k: v for k, v in tree.items() if k == "runs_dir"}))
        path = find_resume(resume, runs_dir, "")
        payload = load_checkpoint(path)
        require_keys(payload, path, RESUME_KEYS, "--resume")
        return RunStart(resolve(resumed_config(payload, tree), get_registries()), path, payload)
    return RunStart(resolve(run_config_from_dict(tree), get_registries()))


def resume_newest(start: RunStart) -> RunStart:
    """``start`` continuing the newest run of the same configuration under its runs directory, if
    there is one (``finished`` if that run already finished)."""
    from .checkpoint import load_checkpoint
    from .trainer import FINISHED_MARKER

    from .orphans import find_orphans

    resolved = start.resolved
    runs_dir, identity = default_runs_dir(resolved.config), config_identity(resolved.to_dict())
    start = attrs.evolve(start, orphans=tuple(find_orphans(runs_dir, identity)))
    path = find_resume("auto", runs_dir, identity)
    if path is None:
        return start
    if (path.parent / FINISHED_MARKER).exists():
        return attrs.evolve(start, resume_path=path, finished=True)
    return attrs.evolve(start, resume_path=path, resume_payload=load_checkpoint(path))


@contextlib.contextmanager
def finished_on_failure(tracker) -> Iterator[Any]:
    """An exception inside ends the tracker's run as KILLED (Ctrl-C, SIGTERM) or FAILED, and goes on.
    A store that cannot record that either (its disk is full) leaves the run RUNNING, which
    ``--resume auto`` and the next run's orphan check handle: the exception inside is the news."""
    try:
        yield tracker
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


def _record_run(start: RunStart, output_dir: Path, run_id: Optional[str], tracking_uri: str) -> None:
    """Write the run folder's ``run.json`` and supersede the orphans ``--resume auto`` found."""
    from .orphans import supersede, write_marker

    write_marker(output_dir, config_identity(start.resolved.to_dict()), run_id, tracking_uri)
    for orphan in start.orphans:
        if orphan != output_dir:
            supersede(orphan, f"run {run_id}" if run_id else f"the untracked run in {output_dir}")


@contextlib.contextmanager
def _disk_full_is_a_failure(output_dir: Path) -> Iterator[None]:
    """A full disk (or quota) while training ends the run with one line naming the checkpoint kept
    (an atomic write leaves the previous one whole); a full MLflow store arrives here as the same
    OSError (``tracking._full_store_is_enospc``)."""
    import errno

    from ..errors import TrainingFailed

    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        latest = output_dir / "checkpoint.pt"
        kept = f"the last checkpoint, {latest}, is kept" if latest.is_file() else "no checkpoint had been written yet"
        where = f" writing {exc.filename}" if exc.filename else ""
        raise TrainingFailed(f"no space left on the device{where} ({exc.strerror or exc}); {kept}; "
                             f"free some space and resume with --resume auto") from None


@contextlib.contextmanager
def _reported_interruption(output_dir: Path, max_steps: int, tracked: bool) -> Iterator[None]:
    """Every interruption leaves as a ``TrainingInterrupted`` that names what was saved and the
    command that resumes it."""
    from .interruption import TrainingInterrupted, interrupted_on_disk

    try:
        yield
    except TrainingInterrupted as exc:
        exc.tracked = tracked
        raise
    except KeyboardInterrupt:
        interrupted = interrupted_on_disk(output_dir, max_steps)
        interrupted.tracked = tracked
        raise interrupted from None


def load_run_teacher(resolved: Resolved, spec, device, *, runs_dir: Path, tracking_uri: str):
    """The teacher ``resolved`` distils (None when it names none), loaded and so checked."""
    from ..contracts import TeacherContext
    from ..plugin_manager import get_registries
    from ..teachers import load_teacher

    config = resolved.config
    if not config.teacher:
        return None
    context = TeacherContext(data=spec, dataset_name=config.dataset, dataset_config=resolved.dataset_config,
                             device=device, runs_dir=str(runs_dir), tracking_uri=tracking_uri)
    return load_teacher(config.teacher, get_registries(), context)


def check_resume_step(payload: dict, path: Path, max_steps: int) -> None:
    """A checkpoint past ``train.max_steps`` cannot be continued to it."""
    step = int(payload["step"])
    if step > max_steps:
        raise ConfigError("train.max_steps", max_steps, f"at least the step of the checkpoint resumed, {step} "
                          f"({path}); pass --max-steps {step} or more")


def check_weights_fit(resolved: Resolved, spec, teacher, payload: dict, path: Path) -> None:
    """The checkpoint's weights have the keys and shapes of the networks its config builds (checked
    on the CPU, before a run is reopened or anything is written)."""
    import torch

    from ..errors import UsageError
    from .build import build_networks

    method, networks = build_networks(resolved, spec, torch.device("cpu"), seed=0, teacher=teacher)
    saved = {method.sampling_network: payload["student"], **payload.get("networks", {})}
    for name, module in networks.items():
        if name not in saved:
            raise UsageError(f"checkpoint {path} has no weights for the network {name!r} of method {resolved.config.method}")
        wanted, found = module.state_dict(), saved[name]
        for key, tensor in wanted.items():
            if key not in found or not hasattr(found[key], "shape") or tuple(found[key].shape) != tuple(tensor.shape):
                got = tuple(found[key].shape) if key in found and hasattr(found[key], "shape") else "missing"
                raise UsageError(f"checkpoint {path} does not fit the network its config builds: {name}.{key} "
                                 f"is {got}, the network needs {tuple(tensor.shape)}")
        extra = sorted(set(found) - set(wanted))
        if extra:
            raise UsageError(f"checkpoint {path} does not fit the network its config builds: {name}.{extra[0]} "
                             f"is not a weight of that network")


@attrs.frozen
class Launched:
    """What ``launch`` trained. ``training`` is None on the ranks of ``torchrun`` other than 0,
    which report nothing; ``tracking_uri`` is "" when the run was not tracked."""

    training: Any  # distillkit.training.trainer.RunResult, or None
    tracking_uri: str = ""
    exports: tuple = ()  # distillkit.export.Exported, one per --export format


def export_nfe_for(resolved: Resolved, nfe: Optional[int]) -> int:
    """The NFE ``--export`` builds in (default: the smallest evaluated), checked against the run's
    sampler before anything is trained (one-line ConfigError)."""
    from ..evaluation.choice import choose_sampling
    from ..plugin_manager import get_registries

    chosen = nfe if nfe is not None else min(resolved.config.sample.nfe)
    choose_sampling(resolved, get_registries()).time_grid(chosen, "--export-nfe")
    return chosen


def launch(start: RunStart, *, track: bool = True, progress: bool = True, export: tuple[str, ...] = (),
           export_nfe: Optional[int] = None) -> Launched:
    """Train ``start`` (resuming its checkpoint, if any) in a new or continued MLflow run, or
    untracked; every input is checked before the run or its folder is created. ``export``:
    formats (``distillkit.export.FORMATS``) the finished run is exported to, at ``export_nfe``,
    into ``<run folder>/export`` (``--format mlflow`` also logged to the run)."""
    # Imported here: the trainer pulls in torchdata, tqdm and the evaluation code.
    from ..arguments import check_device_available, check_writable
    from ..tracking import MlflowTracker, NullTracker, check_reachable, resolve_tracking_uri
    from . import distributed as dist_setup
    from .build import build_dataset
    from .trainer import train

    resolved, config = start.resolved, start.resolved.config
    if start.resume_payload is not None:
        check_resume_step(start.resume_payload, start.resume_path, config.train.max_steps)
    if export:
        export_nfe = export_nfe_for(resolved, export_nfe)
    check_device_available(config.device)
    if track:  # an unreachable server is found before anything is written
        check_reachable(resolve_tracking_uri(config.tracking_uri, default_runs_dir(config)))
    distributed, device = dist_setup.setup(config.device)
    try:
        runs_dir = default_runs_dir(config)
        # Data and teacher first: a missing file must stop the run before anything is created.
        dataset = build_dataset(resolved)
        teacher = load_run_teacher(resolved, dataset.spec, device, runs_dir=runs_dir, tracking_uri=config.tracking_uri)
        if start.resume_payload is not None:
            check_weights_fit(resolved, dataset.spec, teacher, start.resume_payload, start.resume_path)
        if distributed.is_main:
            check_writable(runs_dir)

        tracking_uri = ""
        previous_run = start.resume_payload.get("run_id") if start.resume_payload else None
        if not track or not distributed.is_main:
            tracker = NullTracker()
            tracker.run_id = previous_run
        else:
            tracking_uri = resolve_tracking_uri(config.tracking_uri, runs_dir)
            variant = f"-{config.integrator}" if resolved.method_cls.uses_integrator else ""
            tracker = MlflowTracker(tracking_uri, config.experiment, runs_dir / "artifacts",
                                    run_name=f"{config.method}{variant}-{config.dataset}", run_id=previous_run)
        if start.resume_path is not None:
            output_dir = start.resume_path.parent
        else:
            name = tracker.run_id or datetime.datetime.now().strftime("untracked-%Y%m%d-%H%M%S-%f")
            output_dir = runs_dir / "runs" / distributed.broadcast(name)
        with finished_on_failure(tracker), _reported_interruption(output_dir, config.train.max_steps, track), \
                _disk_full_is_a_failure(output_dir):
            if distributed.is_main:
                _record_run(start, output_dir, tracker.run_id, tracking_uri)
            result = train(resolved, tracker, output_dir, dataset=dataset, teacher=teacher,
                           resume=start.resume_payload, distributed=distributed, device=device, progress=progress)
            tracker.finish("FINISHED")
    finally:
        dist_setup.teardown(distributed)
    exports: tuple = ()
    if export and distributed.is_main:
        from ..export import export_after_run

        exports = tuple(export_after_run(result.checkpoint, export, export_nfe, output_dir / "export",
                                         run_id=result.run_id, tracking_uri=tracking_uri))
    return Launched(result if distributed.is_main else None, tracking_uri, exports)
