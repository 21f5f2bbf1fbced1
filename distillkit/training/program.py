"""What a run trains: its networks, each with an optimizer, a schedule and EMAs, and the state a
checkpoint holds (``TrainingState``).

A single-network method has one network, ``student``; its checkpoint keys are the ones
distillkit has always written (``student``, ``ema``, ``emas``, ``ema_state``, ``default_ema``,
``optimizer``, ``scheduler``). A multi-network method's other networks go under ``networks``,
``network_emas`` and ``network_ema_state``; every network's optimizer and schedule under
``optimizers`` and ``schedulers`` (the sampling network's also under the old names, which cost
nothing: ``torch.save`` writes a shared tensor once).
"""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import OptimizerConfig, TrainConfig
from ..contracts import Method
from ..errors import ConfigError
from .distributed import Distributed
from .ema import make_emas
from .optim import FOUND_INF, build_optimizer, build_scheduler, load_optimizer

#: the ``default_ema`` of a run whose sampling network has no EMA: its online weights.
ONLINE = "online"


@attrs.define(eq=False)
class Network:
    """One trainable network and everything that updates it."""

    name: str
    module: nn.Module  # the plain network: checkpointed, averaged, given to frozen uses
    config: OptimizerConfig
    parameters: list  # walked once: a large network has thousands of modules
    trainable: list  # the parameters that require a gradient (toggled off while others update)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    emas: dict  # name -> ExponentialAverage
    model: nn.Module  # what its updates call: DDP- and compile-wrapped as configured
    ddp: Optional[DistributedDataParallel] = None

    def set_trainable(self, flag: bool) -> None:
        for parameter in self.trainable:
            parameter.requires_grad_(flag)


def optimizer_configs(method: Method, names: list[str], cfg: TrainConfig) -> dict[str, OptimizerConfig]:
    """Each network's ``OptimizerConfig``: the method's choice from the run's default, with the
    user's ``train.networks.<name>`` options on top."""
    unknown = sorted(set(cfg.networks) - set(names))
    if unknown:
        raise ConfigError(f"train.networks.{unknown[0]}", cfg.networks[unknown[0]],
                          f"options of one of the networks of method {method.name}: " + ", ".join(names))
    default = cfg.optimizer_config()
    return {name: cfg.optimizer_config(name, base=method.optimizer_config(name, default)) for name in names}


def build_network(name: str, module: nn.Module, config: OptimizerConfig, cfg: TrainConfig, *, averaged: bool,
                  fused: bool = False) -> Network:
    """The optimizer, schedule, EMAs and wrappers of one network (in the order distillkit has always
    built them: EMAs, optimizer, schedule; DDP and compile after the loss scaler)."""
    emas = (make_emas(module, cfg.ema_decay, cfg.ema_halflife_images, cfg.ema_rampup_ratio, cfg.batch_size)
            if averaged else {})
    parameters = list(module.parameters())
    optimizer = build_optimizer(parameters, config, fused=fused)
    scheduler = build_scheduler(optimizer, config, cfg.max_steps)
    trainable = [p for p in parameters if p.requires_grad]
    return Network(name, module, config, parameters, trainable, optimizer, scheduler, emas, model=module)


def wrap(network: Network, cfg: TrainConfig, distributed: Distributed, device: torch.device) -> None:
    """DDP (gradients averaged over ranks) and ``torch.compile``, as the run asks."""
    model: nn.Module = network.module
    if distributed.enabled:
        network.ddp = DistributedDataParallel(network.module, device_ids=[device.index] if device.type == "cuda" else None)
        model = network.ddp
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    network.model = model


class TrainingState:
    """Everything a checkpoint restores: the networks with their optimizers, schedules and EMAs,
    the loss scaler, the method's own state, the step count and the skipped updates. (The RNG
    states and data positions are per rank; the ``Checkpointer`` gathers them.)"""

    def __init__(self, method: Method, networks: dict[str, Network], scaler: torch.amp.GradScaler,
                 check_on_device: bool = False):
        self.method = method
        #: ``train.nonfinite_check`` as decided for this run (``nonfinite_on_device``)
        self.check_on_device = check_on_device
        self.networks = networks
        self.scaler = scaler
        self.sampling = method.sampling_network
        self.step = 0
        self.skipped = 0
        self.skipped_at: list[int] = []  # the (1-based) steps whose updates were skipped, for the report
        #: (step, largest |weight| after it) not yet read back from the device: the weights check
        #: of a step rides on the next step's one wait (or is read before a checkpoint).
        self.pending_weights: Optional[tuple[int, torch.Tensor]] = None
        #: the last step's values on their way to the host, not yet checked (device-side check only)
        self.pending_step: Any = None
        self._weights: Optional[list[torch.Tensor]] = None

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every trained and averaged weight tensor (walked once: a large network has thousands
        of modules; the tensors are updated in place)."""
        if self._weights is None:
            self._weights = [p.detach() for n in self.networks.values() for p in n.parameters]
            self._weights += [p.detach() for n in self.networks.values() for ema in n.emas.values()
                              for p in ema.module.parameters()]
        return self._weights

    @property
    def student(self) -> Network:
        return self.networks[self.sampling]

    @property
    def default_ema(self) -> str:
        return next(iter(self.student.emas), ONLINE)

    def sampling_weights(self) -> nn.Module:
        """What is sampled and evaluated: the sampling network's default EMA (its online weights
        when it has none)."""
        emas = self.student.emas
        return emas[self.default_ema].module if emas else self.student.module

    def others(self) -> list[Network]:
        return [network for name, network in self.networks.items() if name != self.sampling]

    def state_dict(self) -> dict[str, Any]:
        student = self.student
        optimizers = {name: network.optimizer.state_dict() for name, network in self.networks.items()}
        schedulers = {name: network.scheduler.state_dict() for name, network in self.networks.items()}
        state = {
            "student": student.module.state_dict(),
            "ema": self.sampling_weights().state_dict(),
            "emas": {name: ema.module.state_dict() for name, ema in student.emas.items()},
            "ema_state": {name: ema.state_dict() for name, ema in student.emas.items()},
            "default_ema": self.default_ema,
            "optimizer": optimizers[self.sampling], "scheduler": schedulers[self.sampling],
            "optimizers": optimizers, "schedulers": schedulers,
            "scaler": self.scaler.state_dict(), "method": self.method.state_dict(),
            "step": self.step, "skipped_steps": self.skipped, "skipped_at": list(self.skipped_at),
        }
        others = self.others()
        if others:
            state["networks"] = {n.name: n.module.state_dict() for n in others}
            state["network_emas"] = {n.name: {e: ema.module.state_dict() for e, ema in n.emas.items()} for n in others}
            state["network_ema_state"] = {n.name: {e: ema.state_dict() for e, ema in n.emas.items()} for n in others}
        return state

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Restore ``state_dict()``; a version-1 checkpoint (one network, ``optimizer`` and
        ``scheduler`` only) too."""
        self.student.module.load_state_dict(payload["student"])
        for name, ema in self.student.emas.items():
            ema.load_state_dict(payload["ema_state"][name])
        for network in self.others():
            network.module.load_state_dict(payload["networks"][network.name])
            for name, ema in network.emas.items():
                ema.load_state_dict(payload["network_ema_state"][network.name][name])
        optimizers = payload.get("optimizers", {self.sampling: payload["optimizer"]})
        schedulers = payload.get("schedulers", {self.sampling: payload["scheduler"]})
        for name, network in self.networks.items():
            load_optimizer(network.optimizer, optimizers[name])
            network.scheduler.load_state_dict(schedulers[name])
        self.scaler.load_state_dict(payload["scaler"])
        self.method.load_state_dict(payload["method"])
        self.step = int(payload["step"])
        self.skipped = int(payload.get("skipped_steps", 0))
        self.skipped_at = [int(step) for step in payload.get("skipped_at", [])]


def build_state(method: Method, modules: dict[str, nn.Module], cfg: TrainConfig, *, distributed: Distributed,
                device: torch.device) -> TrainingState:
    configs = optimizer_configs(method, list(modules), cfg)
    averaged = set(method.ema_networks())
    unknown = sorted(averaged - set(modules))
    if unknown:
        raise TypeError(f"method {method.name}: ema_networks names {unknown[0]!r}, which build_networks did not build")
    on_device = nonfinite_on_device(method, configs, cfg, device)
    networks = {name: build_network(name, module, configs[name], cfg, averaged=name in averaged, fused=on_device)
                for name, module in modules.items()}
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    for network in networks.values():
        wrap(network, cfg, distributed, device)
    return TrainingState(method, networks, scaler, check_on_device=on_device)


def _device_check_refused(method: Method, configs: dict[str, OptimizerConfig], cfg: TrainConfig,
                          device: torch.device) -> Optional[str]:
    """Why this run cannot decide ``train.nonfinite`` on the device (None: it can)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if cfg.precision == "fp16":
        return "under fp16 the loss scaler decides about overflowing steps itself"
    if device.type not in _get_fused_kernels_supported_devices():
        return f"torch has no fused optimizer on {device.type}"
    for name, config in configs.items():
        if config.optimizer not in FOUND_INF:
            return (f"{config.optimizer} (network {name}) has no fused implementation that takes a found-inf flag; "
                    + " and ".join(FOUND_INF) + " have")
    changes_after_step = type(method).after_step is not Method.after_step or method.data_changes_after_step
    if cfg.nonfinite == "skip" and changes_after_step:
        # Under stop, after_step may run before the step's flag is read: a bad step ends the run
        # before anything it changed is saved. Under skip it must not run for a skipped step.
        return (f"method {method.name} changes its own state after each step (after_step), which a step skipped "
                f"under train.nonfinite=skip must not do before its flag is read")
    return None


def nonfinite_on_device(method: Method, configs: dict[str, OptimizerConfig], cfg: TrainConfig,
                        device: torch.device) -> bool:
    """``train.nonfinite_check`` decided: auto is the device check on CUDA when the run allows it
    (on a CPU nothing runs ahead of the host, so there is no wait to save); an explicit ``device``
    that the run does not allow is a one-line error."""
    if cfg.nonfinite_check == "host":
        return False
    refused = _device_check_refused(method, configs, cfg, device)
    if cfg.nonfinite_check == "device" and refused:
        raise ConfigError("train.nonfinite_check", "device", f"host or auto for this run: {refused}")
    return refused is None and (cfg.nonfinite_check == "device" or device.type == "cuda")
