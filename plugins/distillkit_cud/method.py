"""The CUD method: options, the student with look-ahead heads (and the optional coupling
encoder), the target network, the catch-up loss, sampling, and the Prior ShakeDrop φ check."""

from __future__ import annotations

from typing import Any, Optional

import attrs
import torch

import distillkit
from distillkit import validators
from distillkit import ButcherTableau, Method, TargetNetwork, ema_update_, unwrap_module  # noqa: F401 - ema_update_ re-exported

from .encoder import BackboneEncoder, ConvEncoder, MLPEncoder
from .heads import MultiHeadStudent
from .loss import catch_up_loss

#: The catch-up slope of CUD's RK3 variant (METHODS.md §2.8): stages at t, t - Δ and t - 2Δ with
#: weights 5/12, 2/3, -1/12. It is *not* Kutta's RK3; as a one-step method it is second order.
PAPER_RK3 = ButcherTableau(
    name="cud-rk3",
    a=((0, 0, 0), (1, 0, 0), (7 / 4, 1 / 4, 0)),
    b=(5 / 12, 2 / 3, -1 / 12),
    c=(0, 1, 2),
    order=2,
    description="CUD's RK3 catch-up slope (paper §2.8): k3 at t - 2h, weights 5/12, 2/3, -1/12",
)

DELTA_MODES = ("uniform", "origin", "rule")
TARGETS = ("live", "ema")
#: "adaptive" is the paper's ω1, ω2 schedule, which its code applies only to the Euler variant;
#: "adaptive-all-heads" is this plugin's extension of it to any tableau and head count.
WEIGHTINGS = ("constant", "adaptive", "adaptive-all-heads")
DISTANCES = ("mse", "pseudo-huber")
COUPLINGS = ("independent", "encoder")


# ------------------------------------------------------------------------------------------------
# validators (one-line ConfigErrors naming the option, the value and what is allowed)


def _small_time(instance, attribute, value):
    validators.require(validators.is_number(value) and 0.0 <= value < 0.5, attribute, value, "a number in [0, 0.5)")


def _head_index(instance, attribute, value):
    validators.require(validators.is_int(value) and value >= -1, attribute, value, "-1 (the last head) or a head index >= 0")


def _table(instance, attribute, value):
    validators.require(isinstance(value, dict), attribute, value, "a table of backbone options")


def _to_float(value):
    return float(value) if validators.is_int(value) else value


@attrs.frozen
class CUDConfig:
    """Stage-1 options (METHODS.md §2, §5).

    The defaults are the paper's published stage-1 settings except for the coupling: distillkit's
    default is ``coupling = "independent"`` (ε ~ N(0, I), as the paper's ImageNet-64 run), while the
    paper's CIFAR-10 and MNIST runs pair noise with data through an encoder (``coupling =
    "encoder"``, β = ``kl_weight`` = 20, the encoder a small SongUNet: ``encoder = "songunet"`` with
    the ``mnist`` preset, not the default ``auto``). The encoder is a confound when CUD is compared
    with other methods (§2.2), so it is opt-in. Prior ShakeDrop φ is a backbone option
    (``backbone_options.shakedrop``/``phi``, off by default). Each dataset's full paper recipe is a
    file in ``recipes/`` (``cud-mnist.toml``, ``cud-cifar10.toml``, ``cud-imagenet64.toml``).
    """

    # -- catch-up step and time (§2.3-2.4) --
    tn: int = attrs.field(default=16, validator=validators.positive_int)  # TN: Δ ~ U(0, 1/TN), discrete grid k/TN
    delta_mode: str = attrs.field(default="uniform", validator=validators.one_of(*DELTA_MODES))
    discrete_time: bool = attrs.field(default=False, validator=validators.boolean)  # t in {1..TN}/TN
    t_min: float = attrs.field(default=1e-5, converter=_to_float, validator=_small_time)  # δ
    # -- target network (§2.5) --
    target: str = attrs.field(default="live", validator=validators.one_of(*TARGETS))
    target_decay: float = attrs.field(default=0.9999, converter=_to_float, validator=validators.unit_interval)
    # -- alignment integrator and heads (§2.6-2.8) --
    paper_rk3: bool = attrs.field(default=True, validator=validators.boolean)  # "rk3" = the paper's slope
    heads: int = attrs.field(default=0, validator=validators.non_negative_int)  # 0: the tableau's stages
    boundary_mask: bool = attrs.field(default=True, validator=validators.boolean)
    reuse_prediction_as_k1: bool = attrs.field(default=False, validator=validators.boolean)
    # -- loss (§2.6) --
    weighting: str = attrs.field(default="constant", validator=validators.one_of(*WEIGHTINGS))
    catch_up_weight: float = attrs.field(default=1.0, converter=_to_float, validator=validators.non_negative_number)
    ground_truth_weight: float = attrs.field(default=1.0, converter=_to_float, validator=validators.non_negative_number)
    distance: str = attrs.field(default="mse", validator=validators.one_of(*DISTANCES))  # catch-up term
    ground_truth_distance: str = attrs.field(default="mse", validator=validators.one_of(*DISTANCES))
    huber_c: float = attrs.field(default=0.0, converter=_to_float, validator=validators.non_negative_number)  # 0: 0.00054 sqrt(D)
    # -- coupling (§2.2) --
    coupling: str = attrs.field(default="independent", validator=validators.one_of(*COUPLINGS))
    kl_weight: float = attrs.field(default=20.0, converter=_to_float, validator=validators.non_negative_number)  # β
    encoder: str = attrs.field(default="auto")  # auto: small conv / MLP; or a registered backbone
    encoder_channels: int = attrs.field(default=32, validator=validators.positive_int)  # width of the auto encoder
    encoder_options: dict = attrs.field(factory=dict, validator=_table)  # options of a backbone encoder
    # -- sampling (§4) --
    sample_head: int = attrs.field(default=-1, validator=_head_index)  # -1: the last head

    def __attrs_post_init__(self) -> None:
        if self.discrete_time and self.delta_mode == "rule":
            raise distillkit.ConfigError(
                "delta_mode", self.delta_mode,
                "uniform or origin with discrete_time = true (Δ = t/TN is off the discrete grid)",
            )
        if self.encoder != "auto":
            backbones = distillkit.get_registries().backbones
            if self.encoder not in backbones.names():
                raise distillkit.ConfigError(
                    "encoder", self.encoder, "auto or a registered backbone: " + ", ".join(backbones.names())
                )
            backbone_config(self.encoder, self.encoder_options)
        elif self.encoder_options:
            raise distillkit.ConfigError(
                "encoder_options", self.encoder_options, "empty unless encoder names a backbone"
            )


def backbone_config(name: str, options: dict) -> Any:
    """The config of the registered backbone ``name`` built from ``options`` (TOML values)."""
    cls = distillkit.get_registries().backbones.get(name)
    fields = attrs.fields_dict(cls.config_class)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise distillkit.ConfigError(
            f"encoder_options.{unknown[0]}", options[unknown[0]], f"an option of {name}: " + ", ".join(fields)
        )
    try:
        return cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except distillkit.ConfigError as exc:
        raise distillkit.ConfigError(f"encoder_options.{exc.option}", exc.value, exc.allowed) from None
    except (TypeError, ValueError) as exc:
        raise distillkit.ConfigError("encoder_options", options, str(exc)) from None


# ------------------------------------------------------------------------------------------------
# Prior ShakeDrop φ (§2.9, pitfall P2): recorded in the method's checkpoint state, checked on load


def prior_shakedrop(backbone) -> dict[str, Any]:
    """What the backbone does with CUD's time-dependent skip scaling: ``{"enabled", "phi"}``."""
    config = getattr(backbone, "config", None)
    enabled = bool(getattr(config, "shakedrop", False))
    return {"enabled": enabled, "phi": float(config.phi) if enabled else None}


def without_prior_shakedrop(backbone):
    """``backbone`` with Prior ShakeDrop switched off (unchanged when it is off already).

    The scaling owns no parameters: the backbone's forward reads ``config.shakedrop``, so the
    network with its config evolved to ``shakedrop = false`` is the one built that way, with the
    same parameters and the same initial weights (no second build, no extra random draws)."""
    if prior_shakedrop(backbone)["enabled"]:
        backbone.config = attrs.evolve(backbone.config, shakedrop=False)
    return backbone


def check_prior_shakedrop(recorded: Optional[dict], built: dict, where: str) -> None:
    """Refuse a network rebuilt with another φ than the one it was trained with (P2)."""
    if recorded is None or recorded == built:
        return

    def describe(state):
        return f"phi={state['phi']}" if state["enabled"] else "shakedrop off"

    raise distillkit.UsageError(
        f"{where}: the network was trained with Prior ShakeDrop {describe(recorded)} but is being "
        f"rebuilt with {describe(built)}; set backbone_options.shakedrop/phi to the trained values "
        "(METHODS.md pitfall P2)"
    )


class CatchUpDistillation(Method):
    """The network catches up with its own velocity a step Δ further along its own trajectory.

    With an alignment tableau of s stages the student gets H heads (default H = s); head j
    regresses the velocity j catch-up steps ahead (paper §2.6-2.8): Euler -> 1, RK2 -> 2, RK3 -> 3.
    """

    name = "cud"
    config_class = CUDConfig
    uses_integrator = True
    #: the look-ahead heads and the encoder read the backbone's decoder features
    backbone_capabilities = frozenset({distillkit.OUTPUT_HEADS})

    def __init__(self, config: CUDConfig, context):
        super().__init__(config, context)
        use_paper = context.integrator_name == "rk3" and config.paper_rk3
        self.tableau: ButcherTableau = PAPER_RK3 if use_paper else context.integrator
        self.heads = config.heads or self.tableau.stages
        if config.sample_head >= self.heads:
            raise distillkit.ConfigError(
                "method_options.sample_head", config.sample_head,
                f"-1 or a head index below {self.heads} ({self.tableau.name} trains {self.heads} heads)",
            )
        self._check_weighting()
        if config.coupling == "encoder" and len(context.data.shape) not in (1, 3) and config.encoder == "auto":
            raise distillkit.ConfigError(
                "method_options.encoder", config.encoder,
                f"a registered backbone: the auto encoder handles vectors [D] and images [C, H, W], not {context.data.shape}",
            )
        # θ⁻ ← μ θ⁻ + (1 - μ) θ on parameters and floating buffers (distillkit.TargetNetwork)
        self._target = TargetNetwork()
        self.prior_shakedrop: Optional[dict] = None

    def _check_weighting(self) -> None:
        # The paper's code schedules ω1, ω2 only in its Euler variant (pred_step 1: one stage, one
        # head); its RK2/RK3 variants always weigh every term 1. Elsewhere it is an extension,
        # which must be asked for by name.
        euler_variant = self.tableau.stages == 1 and self.heads == 1
        if self.config.weighting == "adaptive" and not euler_variant:
            raise distillkit.ConfigError(
                "method_options.weighting", "adaptive",
                f"constant or adaptive-all-heads with {self.tableau.name} and {self.heads} heads (the paper "
                "applies adaptive only to its Euler variant: --integrator euler with one head)",
            )

    # -- the student -------------------------------------------------------------------------

    def build_student(self, backbone):
        self.prior_shakedrop = prior_shakedrop(backbone)
        return MultiHeadStudent(backbone, extra_heads=self.heads - 1, encoder=self._build_encoder(backbone))

    def _build_encoder(self, backbone) -> Optional[torch.nn.Module]:
        if self.config.coupling != "encoder":
            return None
        data = self.context.data
        if self.config.encoder == "auto":
            encoder = (
                ConvEncoder(data.shape[0], self.config.encoder_channels)
                if data.is_image
                else MLPEncoder(data.shape[0], self.config.encoder_channels)
            )
        else:
            cls = distillkit.get_registries().backbones.get(self.config.encoder)
            encoder = BackboneEncoder(cls.build(backbone_config(self.config.encoder, self.config.encoder_options), data))
        reference = next(backbone.parameters(), None)
        return encoder if reference is None else encoder.to(device=reference.device, dtype=reference.dtype)

    # -- the target network (§2.5) ------------------------------------------------------------

    @property
    def target_network(self) -> Optional[torch.nn.Module]:
        """The EMA target's copy of the trunk (None: the live network is the target, or before prepare)."""
        return self._target.module

    @staticmethod
    def _trunk(student) -> torch.nn.Module:
        # Only the trunk with its main head produces targets: the backbone, not the extra heads
        # or the encoder.
        student = unwrap_module(student)
        return getattr(student, "backbone", student)

    def prepare(self, student, context):
        if self.config.target == "ema":
            self._make_target(student)

    def _make_target(self, student) -> None:
        # The copy keeps the student's mode (train: dropout as in the live case).
        self._target.start(self._trunk(student))

    def after_step(self, student, step):
        if self._target.started:
            self._target.update(self._trunk(student), self.config.target_decay)

    def state_dict(self):
        state: dict[str, Any] = {"prior_shakedrop": self.prior_shakedrop}
        target = self._target.state_dict()
        if target is not None:
            state["target"] = target
        return state

    def load_state_dict(self, state):
        if self.prior_shakedrop is not None:
            check_prior_shakedrop(state.get("prior_shakedrop"), self.prior_shakedrop, "cud checkpoint")
        if "target" in state:
            self._target.load_state_dict(state["target"])  # before prepare: restored when it builds the target

    # -- cost, tags, loss, sampling -----------------------------------------------------------

    def network_evals_per_step(self):
        # One pass of the shared trunk with gradient (all heads); s stage slopes (one fewer when
        # k1 reuses the prediction) and H look-ahead targets without.
        # The coupling encoder's one pass with gradient is not a velocity-network evaluation: it is
        # named in the tags (distillkit.cud.coupling).
        no_grad = self.tableau.stages + self.heads - (1 if self.config.reuse_prediction_as_k1 else 0)
        return {"with_grad": 1, "no_grad": no_grad}

    def tags(self):
        shakedrop = self.prior_shakedrop or {"enabled": False}
        return {
            "distillkit.cud.alignment": self.tableau.name,
            "distillkit.cud.heads": str(self.heads),
            "distillkit.cud.delta": f"{self.config.delta_mode}/{self.config.tn}"
            + ("/discrete" if self.config.discrete_time else ""),
            "distillkit.cud.target": self.config.target
            + (f"/{self.config.target_decay:g}" if self.config.target == "ema" else ""),
            "distillkit.cud.coupling": self.config.coupling
            + (f"/{self.config.encoder} encoder, 1 pass with grad, beta={self.config.kl_weight:g}"
               if self.config.coupling == "encoder" else ""),
            "distillkit.cud.prior_shakedrop": f"phi={shakedrop['phi']:g}" if shakedrop["enabled"] else "off",
        }

    def loss(self, student, batch, generator, step):
        if self.config.target == "ema" and self.target_network is None:
            self._make_target(student)  # prepare was not called (direct use of the method)
        return catch_up_loss(
            student, batch, generator, step,
            tableau=self.tableau, heads=self.heads, config=self.config,
            total_steps=self.context.total_steps, target_network=self.target_network,
        )

    def velocity_fn(self, student, cond=None):
        head = self.heads - 1 if self.config.sample_head == -1 else self.config.sample_head

        def velocity(x, t):
            return student(x, t, cond, head=head)

        return velocity
