"""The contract every backbone must satisfy, as a reusable pytest test base.

A plugin that registers a backbone checks it with::

    from distillkit.testing.backbones import BackboneConformance

    class TestMyBackbone(BackboneConformance):
        backbone_name = "my-net"          # a registered name ...
        # backbone_class = MyNet          # ... or the class itself (registered or not)

        def options(self, name):          # options that keep it tiny (well under a second on CPU)
            return {"channels": 8}

or, to check several backbones, with a fixture named ``backbone_name`` in the test module::

    @pytest.fixture(params=["unet", "my-net"])
    def backbone_name(request):
        return request.param

    class TestMyBackbones(BackboneConformance):
        pass

What is checked, for each backbone and each kind of data it takes (images ``image_shape``,
vectors ``vector_shape``; ``data_kinds(name)`` says which, or they are found by trying):

- it builds with ``cls.build(config, spec)`` from its options; data of a kind it does not take
  are refused when it is built, with a one-line ``ValueError`` (or ``UsageError``) naming the shape;
- the output is shaped like ``x``, finite, and the same for the same seed (different for another);
- the time and, for class-conditional data, the labels change the output; labels are required
  exactly when the data have classes; a sample's output does not depend on its batch-mates;
- one backward pass reaches every parameter;
- ``accepts_conditioning``: built with ``conditioning=("d", "r")`` it needs both in ``extra``
  (one value per sample), refuses a missing or an unknown name and a value not of shape
  ``[batch]``; ``d`` changes the output, the gradient reaches ``d`` and the weights that embed it;
- ``OUTPUT_HEADS``: ``return_features=True`` gives ``(out, features)`` with ``out`` unchanged,
  and a head from ``make_output_head()`` maps the features to the shape of ``x``, starts near
  zero (but not at zero), is trainable, and follows the network's dtype.

Networks whose residual branches and output layer start near zero (DDPM++, ADM) barely respond
to their inputs at initialisation; the sensitivity checks first give such layers ordinary weights
(``wake_up_``), so that they compare numbers well above rounding.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import pytest
import torch

from ..config import build_attrs
from ..contracts import OUTPUT_HEADS, Backbone, DataSpec
from ..errors import UsageError
from ..plugin_manager import get_registries

IMAGES = "images"
VECTORS = "vectors"
#: the conditioning inputs the conditioning checks build with
CONDITIONING = ("d", "r")


def wake_up_(model: torch.nn.Module, threshold: float = 1e-3, std: float = 0.05, seed: int = 1234) -> torch.nn.Module:
    """Redraw every weight matrix whose entries are all below ``threshold`` (layers initialised
    near zero on purpose) from N(0, std^2), so that inputs reach the output at a measurable size."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1 and parameter.abs().max() < threshold:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * std)
    return model


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, f"not a one-line error: {message!r}"
    return message


class BackboneConformance:
    """Subclass as ``class TestX(BackboneConformance)`` and name the backbone (see module docstring)."""

    backbone_name: ClassVar[Optional[str]] = None
    backbone_class: ClassVar[Optional[type]] = None

    image_shape: ClassVar[tuple[int, ...]] = (3, 8, 8)
    vector_shape: ClassVar[tuple[int, ...]] = (5,)
    num_classes: ClassVar[int] = 4
    batch_size: ClassVar[int] = 3
    seed: ClassVar[int] = 0

    # -- hooks ----------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        # A subclass that names its backbone is parametrised with it; one whose module defines a
        # `backbone_name` fixture instead is left to pytest.
        cls = type(self)
        name = cls.backbone_class.name if isinstance(cls.backbone_class, type) else cls.backbone_name
        if isinstance(name, str) and "backbone_name" in metafunc.fixturenames:
            metafunc.parametrize("backbone_name", [name], ids=[name], scope="class")

    def options(self, name: str) -> dict:
        """``backbone_options`` for the backbone named ``name`` (default: none, its defaults)."""
        return {}

    def data_kinds(self, name: str) -> Optional[frozenset[str]]:
        """The kinds of data (``IMAGES``, ``VECTORS``) the backbone takes; None (the default):
        whichever it builds for. Declaring them makes the refusal of the others a checked promise."""
        return None

    def backbone_cls(self, name: str) -> type:
        cls = type(self)
        if isinstance(cls.backbone_class, type) and cls.backbone_class.name == name:
            return cls.backbone_class
        return get_registries().backbones.get(name)

    def spec(self, kind: str, num_classes: Optional[int] = None) -> DataSpec:
        return DataSpec(self.image_shape if kind == IMAGES else self.vector_shape, num_classes)

    def build(self, name: str, spec: DataSpec, *, conditioning: tuple[str, ...] = (), seed: Optional[int] = None
              ) -> Backbone:
        """The backbone as the core builds it, in eval mode (no dropout noise in comparisons)."""
        cls = self.backbone_cls(name)
        config = build_attrs(cls.config_class, dict(self.options(name)), "backbone_options.")
        torch.manual_seed(self.seed if seed is None else seed)
        model = cls.build(config, spec, conditioning) if conditioning else cls.build(config, spec)
        return model.eval()

    def kinds(self, name: str) -> list[str]:
        declared = self.data_kinds(name)
        if declared is not None:
            return sorted(declared)
        found = []
        for kind in (IMAGES, VECTORS):
            try:
                self.build(name, self.spec(kind))
            except (ValueError, UsageError):
                continue
            found.append(kind)
        return found

    def inputs(self, spec: DataSpec, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``x``, one time per sample in (0, 1), and labels when the data have classes."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch_size, *spec.shape, generator=generator)
        t = torch.rand(self.batch_size, generator=generator) * 0.8 + 0.1
        labels = None
        if spec.num_classes is not None:
            labels = torch.arange(self.batch_size) % spec.num_classes
        return x, t, labels

    def conditioning_values(self, seed: int = 2) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(self.batch_size, generator=generator) for name in CONDITIONING}

    def cases(self, name: str) -> list[DataSpec]:
        """Every spec the backbone is checked on: each kind it takes, without and with labels."""
        kinds = self.kinds(name)
        assert kinds, f"backbone {name} builds for neither images {self.image_shape} nor vectors {self.vector_shape}"
        return [self.spec(kind, classes) for kind in kinds for classes in (None, self.num_classes)]

    def _require(self, name: str, attribute: str) -> type:
        cls = self.backbone_cls(name)
        if attribute == "conditioning" and not cls.accepts_conditioning:
            pytest.skip(f"backbone {name} does not accept extra conditioning inputs")
        if attribute == OUTPUT_HEADS and OUTPUT_HEADS not in cls.capabilities:
            pytest.skip(f"backbone {name} does not provide {OUTPUT_HEADS}")
        return cls

    # -- building -------------------------------------------------------------------------------

    def test_is_a_backbone_with_a_well_formed_declaration(self, backbone_name):
        cls = self.backbone_cls(backbone_name)
        assert issubclass(cls, Backbone) and cls.name == backbone_name
        assert isinstance(cls.accepts_conditioning, bool)
        assert isinstance(cls.capabilities, frozenset) and all(isinstance(c, str) for c in cls.capabilities)
        model = self.build(backbone_name, self.cases(backbone_name)[0])
        assert isinstance(model, cls) and model.num_parameters() == sum(p.numel() for p in model.parameters())

    def test_data_of_a_kind_it_does_not_take_is_refused_when_built(self, backbone_name):
        kinds = self.kinds(backbone_name)
        refused = [kind for kind in (IMAGES, VECTORS) if kind not in kinds]
        if not refused:
            pytest.skip(f"backbone {backbone_name} takes images and vectors")
        for kind in refused:
            spec = self.spec(kind)
            with pytest.raises((ValueError, UsageError)) as caught:
                self.build(backbone_name, spec)
            assert str(spec.shape) in _one_line(caught.value), "the error should name the shape it was given"

    def test_output_is_shaped_like_x_and_finite(self, backbone_name):
        for spec in self.cases(backbone_name):
            model = self.build(backbone_name, spec)
            x, t, labels = self.inputs(spec)
            with torch.no_grad():
                out = model(x, t, labels)
            assert isinstance(out, torch.Tensor) and out.shape == x.shape, f"{spec}: output {tuple(out.shape)}"
            assert out.dtype == x.dtype and torch.isfinite(out).all(), f"{spec}: non-finite output"

    def test_same_seed_same_network_and_output(self, backbone_name):
        for spec in self.cases(backbone_name):
            x, t, labels = self.inputs(spec)
            first, second = self.build(backbone_name, spec), self.build(backbone_name, spec)
            with torch.no_grad():
                assert torch.equal(first(x, t, labels), second(x, t, labels)), f"{spec}: same seed, other output"
            other = self.build(backbone_name, spec, seed=self.seed + 1)
            assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters())), \
                "another seed gives the same weights"

    # -- inputs ---------------------------------------------------------------------------------

    def test_time_changes_the_output(self, backbone_name):
        for spec in self.cases(backbone_name):
            model = wake_up_(self.build(backbone_name, spec))
            x, t, labels = self.inputs(spec)
            with torch.no_grad():
                assert not torch.allclose(model(x, t, labels), model(x, 1.0 - t, labels), atol=1e-5), f"{spec}: t ignored"

    def test_labels_change_the_output_and_are_required_exactly_for_classes(self, backbone_name):
        for kind in self.kinds(backbone_name):
            spec = self.spec(kind, self.num_classes)
            model = wake_up_(self.build(backbone_name, spec))
            x, t, labels = self.inputs(spec)
            other = (labels + 1) % self.num_classes
            with torch.no_grad():
                out = model(x, t, labels)
                assert not torch.allclose(out, model(x, t, other), atol=1e-5), f"{spec}: labels ignored"
                assert torch.equal(out, model(x, t, labels.clone()))
            with pytest.raises(ValueError) as caught:
                model(x, t)
            _one_line(caught.value)
            unconditional = self.build(backbone_name, self.spec(kind))
            with pytest.raises(ValueError) as caught:
                unconditional(x, t, labels)
            _one_line(caught.value)

    def test_samples_do_not_see_their_batch_mates(self, backbone_name):
        for spec in self.cases(backbone_name):
            model = wake_up_(self.build(backbone_name, spec))
            x, t, labels = self.inputs(spec)
            with torch.no_grad():
                whole = model(x, t, labels)
                alone = model(x[:1], t[:1], None if labels is None else labels[:1])
            torch.testing.assert_close(alone, whole[:1], rtol=1e-4, atol=1e-5)

    def test_gradient_reaches_every_parameter(self, backbone_name):
        cls = self.backbone_cls(backbone_name)
        conditioning = CONDITIONING if cls.accepts_conditioning else ()
        for kind in self.kinds(backbone_name):
            spec = self.spec(kind, self.num_classes)
            model = self.build(backbone_name, spec, conditioning=conditioning).train()
            x, t, labels = self.inputs(spec)
            extra = self.conditioning_values() if conditioning else None
            out = model(x, t, labels, extra=extra) if extra else model(x, t, labels)
            (out - x).square().mean().backward()
            for parameter_name, parameter in model.named_parameters():
                assert parameter.grad is not None, f"{spec}: no gradient reaches {parameter_name}"
                assert torch.isfinite(parameter.grad).all(), f"{spec}: non-finite gradient in {parameter_name}"
                assert parameter.grad.abs().sum() > 0, f"{spec}: zero gradient in {parameter_name}"

    # -- extra conditioning ---------------------------------------------------------------------

    def test_conditioning_inputs_change_the_output_and_receive_gradients(self, backbone_name):
        self._require(backbone_name, "conditioning")
        for kind in self.kinds(backbone_name):
            spec = self.spec(kind)
            model = self.build(backbone_name, spec, conditioning=CONDITIONING)
            x, t, _ = self.inputs(spec)
            extra = self.conditioning_values()
            d = extra["d"].clone().requires_grad_(True)
            out = model(x, t, extra={**extra, "d": d})
            assert out.shape == x.shape and torch.isfinite(out).all()
            (grad_d,) = torch.autograd.grad(out.square().sum(), d, allow_unused=True)
            assert grad_d is not None and (grad_d != 0).all(), f"{spec}: the output does not depend on d for every sample"

            awake = wake_up_(model)
            with torch.no_grad():
                base = awake(x, t, extra=extra)
                moved_d = awake(x, t, extra={**extra, "d": 1.0 - extra["d"]})
                moved_r = awake(x, t, extra={**extra, "r": 1.0 - extra["r"]})
            assert not torch.allclose(base, moved_d, atol=1e-5), f"{spec}: d does not change the output"
            assert not torch.allclose(base, moved_r, atol=1e-5), f"{spec}: r does not change the output"

            # the weights that embed d are trained: a loss reaches them through the output
            plain = self.build(backbone_name, spec)
            shared = {n for n, _ in plain.named_parameters()}
            model.zero_grad()
            model(x, t, extra=extra).square().mean().backward()
            new = {n: p for n, p in model.named_parameters() if n not in shared}
            assert new, f"{spec}: building with conditioning added no weights to embed it"
            for parameter_name, parameter in new.items():
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, \
                    f"{spec}: no gradient reaches {parameter_name}"

    def test_conditioning_inputs_are_checked(self, backbone_name):
        self._require(backbone_name, "conditioning")
        spec = self.spec(self.kinds(backbone_name)[0])
        model = self.build(backbone_name, spec, conditioning=CONDITIONING)
        x, t, _ = self.inputs(spec)
        extra = self.conditioning_values()
        bad = {
            "missing": ({"d": extra["d"]}, "r"),
            "none": (None, "d"),
            "unknown": ({**extra, "s": extra["d"]}, "s"),
            "one value for the batch": ({**extra, "d": torch.tensor(0.5)}, "d"),
            "wrong batch": ({**extra, "r": extra["r"][:2]}, "r"),
            "[batch, 1]": ({**extra, "d": extra["d"][:, None]}, "d"),
        }
        for case, (given, named) in bad.items():
            with pytest.raises(ValueError) as caught:
                model(x, t, extra=given)
            assert named in _one_line(caught.value), f"{case}: the error should name {named!r}"
        # without conditioning names, extra inputs are refused and none is fine
        plain = self.build(backbone_name, spec)
        with torch.no_grad():
            assert torch.equal(plain(x, t, extra=None), plain(x, t))
        with pytest.raises(ValueError) as caught:
            plain(x, t, extra={"d": extra["d"]})
        assert "d" in _one_line(caught.value)

    # -- output heads ---------------------------------------------------------------------------

    def test_features_and_new_output_heads(self, backbone_name):
        self._require(backbone_name, OUTPUT_HEADS)
        for spec in self.cases(backbone_name):
            model = self.build(backbone_name, spec)
            x, t, labels = self.inputs(spec)
            result = model(x, t, labels, return_features=True)
            assert isinstance(result, tuple) and len(result) == 2, "return_features=True must give (out, features)"
            out, features = result
            assert torch.equal(out, model(x, t, labels)), "return_features changed the output"
            assert isinstance(features, torch.Tensor) and features.shape[0] == x.shape[0]

            head = model.make_output_head()
            assert isinstance(head, torch.nn.Module)
            head_out = head(features)
            assert head_out.shape == x.shape and torch.isfinite(head_out).all()
            size = float(head_out.detach().abs().max())
            assert 0 < size < 1e-2 * max(1.0, float(out.detach().abs().max())), f"{spec}: a new head starts at {size}"
            head_out.square().sum().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), "head not trainable"

    def test_new_output_heads_follow_the_network_dtype(self, backbone_name):
        self._require(backbone_name, OUTPUT_HEADS)
        spec = self.cases(backbone_name)[0]
        model = self.build(backbone_name, spec).double()
        x, t, labels = self.inputs(spec)
        _, features = model(x.double(), t.double(), labels, return_features=True)
        head_out = model.make_output_head()(features)
        assert head_out.dtype == torch.float64 and head_out.shape == x.shape
