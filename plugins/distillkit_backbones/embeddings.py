"""What the built-in backbones share: the time / label embedding, the embedding of extra scalar
conditioning inputs, input checks and config checks."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

import distillkit

# ---------------------------------------------------------------------------------------------
# Config checks. They raise distillkit.ConfigError naming the field, so the core can prefix it
# ("backbone_options.channels=0 is not allowed: ...") and the CLI prints one line.
# ---------------------------------------------------------------------------------------------


_is_int = distillkit.validators.is_int
positive_int = distillkit.validators.positive_int
dropout_probability = distillkit.validators.unit_interval


def positive_even_int(instance, attribute, value) -> None:
    # Sinusoidal embeddings pair a cosine with a sine, so their width must be even.
    if not (_is_int(value) and value > 0 and value % 2 == 0):
        raise distillkit.ConfigError(attribute.name, value, "a positive even integer")


def optional_positive_int(instance, attribute, value) -> None:
    if value is not None:
        positive_int(instance, attribute, value)


def positive_int_tuple(instance, attribute, value) -> None:
    if not (isinstance(value, tuple) and value and all(_is_int(v) and v > 0 for v in value)):
        raise distillkit.ConfigError(attribute.name, value, "a non-empty list of positive integers")


def to_tuple(value):
    """Converter: lists (TOML arrays, JSON) become tuples so that configs stay hashable."""
    return tuple(value) if isinstance(value, list) else value


def to_float(value):
    """Converter: ``dropout=0`` from a TOML file means 0.0; anything else is left to the validator."""
    return float(value) if _is_int(value) else value


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


class DataKindError(distillkit.ConfigError, ValueError):
    """A backbone built for data it cannot take (an image U-Net on 2-D points). A ConfigError, so
    that the CLI prints one line and exits with code 2, and a ValueError, which is what a Python
    caller building a network by hand expects."""


def require_data_kind(backbone: str, data, images: bool) -> None:
    """Refuse vectors for an image backbone (``images``) or images for a vector backbone."""
    if data.is_image == images and (images or len(data.shape) == 1):
        return
    needs = "image data [C, H, W]" if images else "vector data [D]"
    raise DataKindError("backbone", backbone, f"the {backbone} backbone needs {needs}; the data have shape {data.shape}")


def time_per_sample(t, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of shape ``[batch]`` with ``like``'s dtype and device.

    Samplers pass one time for the whole batch (a float or a 0-dim tensor); training passes one
    per sample. Any tensor with ``batch`` elements (e.g. ``[batch, 1, 1, 1]``) is flattened.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.numel() == batch:
        return t.reshape(batch)
    raise ValueError(f"t must be a scalar or hold one time per sample (batch {batch}); got shape {tuple(t.shape)}")


def check_labels(cond: Optional[torch.Tensor], num_classes: Optional[int], batch: int) -> None:
    if num_classes is None:
        if cond is not None:
            raise ValueError("this backbone was built for unconditional data (num_classes=None) but got cond")
        return
    if cond is None:
        raise ValueError(
            f"this backbone is class-conditional (num_classes={num_classes}): pass cond, "
            f"a LongTensor of labels of shape [batch]"
        )
    if cond.shape != (batch,) or cond.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"cond must be an integer tensor of shape [{batch}]; got {cond.dtype} of shape {tuple(cond.shape)}"
        )


def checked_extra(
    extra: Optional[Mapping[str, torch.Tensor]], names: tuple[str, ...], batch: int, like: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The extra conditioning inputs: exactly the ``names`` the backbone was built with, each a
    tensor ``[batch]`` (returned with ``like``'s dtype and device). Unlike ``t`` there is no
    broadcasting of one value: a step size is a per-sample quantity, and a scalar here is more
    likely a mistake than a shortcut."""
    given = dict(extra) if extra else {}
    unknown = sorted(set(given) - set(names))
    if unknown:
        built = f"with conditioning {list(names)}" if names else "without conditioning inputs"
        raise ValueError(f"unknown conditioning input(s) {unknown} in extra: this backbone was built {built}")
    missing = [name for name in names if name not in given]
    if missing:
        raise ValueError(
            f"missing conditioning input(s) {missing}: this backbone was built with conditioning {list(names)}; "
            f"pass extra={{name: tensor of shape [batch]}} for each"
        )
    checked = {}
    for name in names:
        value = given[name]
        if not isinstance(value, torch.Tensor) or value.shape != (batch,):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"extra[{name!r}] must be a tensor of shape [{batch}] (one value per sample); got {got}")
        checked[name] = value.to(dtype=like.dtype, device=like.device)
    return checked


def checked_inputs(
    x: torch.Tensor,
    t,
    cond: Optional[torch.Tensor],
    data,
    extra: Optional[Mapping[str, torch.Tensor]] = None,
    conditioning: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every backbone's input contract in one place: ``x`` of the data's shape, ``t`` (returned as
    one time per sample), ``cond`` labels exactly when the data has classes, and ``extra`` holding
    exactly the ``conditioning`` inputs the backbone was built with (returned as a dict)."""
    if x.shape[1:] != data.shape:
        kind = "images" if data.is_image else "vectors"
        raise ValueError(f"expected {kind} of shape {data.shape}; got {tuple(x.shape[1:])}")
    batch = x.shape[0]
    check_labels(cond, data.num_classes, batch)
    return time_per_sample(t, batch, x), checked_extra(extra, conditioning, batch, x)


def scale_last_layer_(layer: nn.Module, scale: float = 1e-5) -> None:
    """Shrink a freshly initialised layer so that a new output head starts as a tiny perturbation
    (the DDPM++ ``init_scale`` of its last convolution). The weights stay non-zero so that the
    gradient still reaches the layers before it."""
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.zero_()


# ---------------------------------------------------------------------------------------------
# Time and label embedding
# ---------------------------------------------------------------------------------------------


class PositionalEmbedding(nn.Module):
    """EDM's sinusoidal embedding: ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_positions^(-i/(n-1))``.

    It embeds the raw ``t`` in [0, 1] (no x1000 scaling as in DDPM code), so its frequencies run
    from 1 down to 1e-4: the features are smooth in ``t`` and the MLP after it does the rest.
    """

    def __init__(self, num_channels: int, max_positions: float = 10000.0):
        super().__init__()
        half = num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32) / max(half - 1, 1)
        self.register_buffer("frequencies", (1.0 / max_positions) ** exponents, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Phases in at least float32 even under half precision; float64 models keep float64.
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        phases = t.to(dtype)[:, None] * self.frequencies.to(dtype)[None, :]
        return torch.cat([phases.cos(), phases.sin()], dim=1).to(t.dtype)


def embedding_mlp(positional_dim: int, embedding_dim: int) -> nn.Sequential:
    """The U-Net's and the MLP's time-embedding MLP: Linear -> SiLU -> Linear -> SiLU."""
    return nn.Sequential(
        nn.Linear(positional_dim, embedding_dim),
        nn.SiLU(),
        nn.Linear(embedding_dim, embedding_dim),
        nn.SiLU(),
    )


class ConditionEmbedding(nn.Module):
    """``t`` (and a class label) to the vector every block reads.

    As in EDM, the label embedding is added to the positional embedding of ``t`` before the MLP,
    so the MLP can mix time and class non-linearly. The output has already been through SiLU, so
    each block only applies its own linear projection.
    """

    def __init__(self, positional_dim: int, embedding_dim: int, num_classes: Optional[int]):
        super().__init__()
        self.num_classes = num_classes
        self.positional = PositionalEmbedding(positional_dim)
        self.label = None if num_classes is None else nn.Embedding(num_classes, positional_dim)
        self.mlp = embedding_mlp(positional_dim, embedding_dim)

    def forward(self, t: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
        embedding = self.positional(t)
        if self.label is not None:
            embedding = embedding + self.label(cond)
        return self.mlp(embedding)


# ---------------------------------------------------------------------------------------------
# Extra scalar conditioning inputs (a step size d, a second time r)
# ---------------------------------------------------------------------------------------------


class ScalarEmbedding(nn.Module):
    """One scalar per sample to an embedding vector: fixed sinusoid ``features`` (a module without
    parameters), then a learned ``mlp``. Each backbone builds it with the features and the MLP
    shape its own ``t`` goes through, so that ``d`` is embedded exactly like ``t``."""

    def __init__(self, features: nn.Module, mlp: nn.Module):
        super().__init__()
        self.features = features
        self.mlp = mlp

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(value))


def _check_conditioning_names(names: tuple[str, ...]) -> None:
    for name in names:
        # Names become module names (state-dict keys), which may not be empty or contain dots.
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"conditioning input names must be identifiers such as 'd' or 'r'; got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"conditioning input names must be distinct; got {list(names)}")


class ExtraEmbedding(nn.Module):
    """The extra scalar inputs a backbone was built with, each embedded like ``t`` by its own
    ``ScalarEmbedding`` (``make_embedding()`` builds one), summed into the time embedding.

    The sum is taken before any block reads the embedding, so every residual block at every
    resolution sees ``d`` exactly as it sees ``t`` (EDM adds its class embedding to the noise
    embedding in the same way); a last-layer add-on could not bend the trajectory of the
    features. Each embedding keeps its network's ordinary initialisation: a freshly conditioned
    network is an ordinary network with one more input, and gradients reach every new weight.

    Built with no names it holds no parameters and adds nothing, so that an unconditioned
    backbone keeps its state-dict keys, its parameter count and its initial weights. The owner
    must create it after all of its other modules: the new weights then take the last draws of
    the RNG and every other weight is drawn as before.
    """

    def __init__(self, names: tuple[str, ...], make_embedding: Callable[[], nn.Module]):
        super().__init__()
        names = tuple(names)
        _check_conditioning_names(names)
        self.names = names
        self.inputs = nn.ModuleDict({name: make_embedding() for name in names})

    def forward(self, embedding: torch.Tensor, extra: Mapping[str, torch.Tensor]) -> torch.Tensor:
        for name in self.names:
            embedding = embedding + self.inputs[name](extra[name])
        return embedding


def positional_scalar_embedding(positional_dim: int, embedding_dim: int) -> ScalarEmbedding:
    """An extra input embedded as ``ConditionEmbedding`` embeds ``t`` (the U-Net's and the MLP's):
    EDM's positional embedding of the raw value, then the same MLP."""
    return ScalarEmbedding(PositionalEmbedding(positional_dim), embedding_mlp(positional_dim, embedding_dim))
