"""EDM's parameter names for the ``songunet`` and ``adm`` backbones, both ways.

EDM (Karras et al. 2022) names the DDPM++ network ``SongUNet`` and the ADM network
``DhariwalUNet``; their state dicts use names such as ``enc.32x32_block0.conv0.weight``. Only
the NAMES and the layer order were read from EDM's ``training/networks.py`` (NVlabs/edm, licence
CC BY-NC-SA: no code was taken); every line below is written for this project.

The correspondence is one to one, module for module, with three rewrites of values:

- attention ``qkv``: EDM lays its 3C output channels out as [head, channel, (q, k, v)]; the
  songunet as [(q, k, v), head, channel], the adm as [head, (q, k, v), channel]. The rows are
  permuted, and the adm's 1-D convolutions drop the trailing 1x1 kernel axis;
- labels: EDM multiplies one-hot labels by a linear layer (SongUNet: with a bias, on
  sqrt(label_dim) x one-hot; DhariwalUNet: without a bias), which is our ``nn.Embedding``
  holding, for class k, the layer's output for label k;
- ``map_augment`` (EDM's augmentation-label input) is dropped: EDM's samplers pass no
  augmentation labels, and the layer has no bias, so it then adds nothing.
The ``resample_filter`` buffers EDM stores are checked against the backbone's filter, not copied.

EDM's NCSN++ variant (Fourier embedding, residual encoder, skip decoder) has no distillkit
backbone and is refused.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import nn

import distillkit
from distillkit import DataSpec

ADM_RESBLOCK = {"in_norm": "norm0", "in_conv": "conv0", "embedding": "affine", "out_norm": "norm1",
                "out_conv": "conv1", "skip": "skip"}
ADM_ATTENTION = {"norm": "norm2", "qkv": "qkv", "proj": "proj"}


class EdmLayoutError(distillkit.UsageError):
    """A state dict that is not an EDM SongUNet / DhariwalUNet the backbones can hold."""


# ---------------------------------------------------------------------------------------------
# Module correspondence: (EDM module path, our module path, our-name -> EDM-name renames)
# ---------------------------------------------------------------------------------------------


def songunet_modules(config, resolution: int) -> list[tuple[str, str, dict]]:
    pairs = [("map_layer0", "map0", {}), ("map_layer1", "map1", {})]
    encoder = 0
    for level, mult in enumerate(config.channel_mult):
        side = resolution >> level
        pairs.append((f"enc.{side}x{side}_conv" if level == 0 else f"enc.{side}x{side}_down", f"encoder.{encoder}", {}))
        encoder += 1
        for index in range(config.num_blocks):
            pairs.append((f"enc.{side}x{side}_block{index}", f"encoder.{encoder}", {}))
            encoder += 1
    decoder = 0
    top = len(config.channel_mult) - 1
    for level in reversed(range(len(config.channel_mult))):
        side = resolution >> level
        heads = ["in0", "in1"] if level == top else ["up"]
        for name in heads + [f"block{i}" for i in range(config.num_blocks + 1)]:
            pairs.append((f"dec.{side}x{side}_{name}", f"decoder.{decoder}", {}))
            decoder += 1
    pairs.append((f"dec.{resolution}x{resolution}_aux_norm", "output_block.norm", {}))
    pairs.append((f"dec.{resolution}x{resolution}_aux_conv", "output_block.conv", {}))
    return pairs


def adm_modules(config, resolution: int) -> list[tuple[str, str, dict]]:
    pairs = [("map_layer0", "time_embedding.0", {}), ("map_layer1", "time_embedding.2", {})]
    pairs.append((f"enc.{resolution}x{resolution}_conv", "input_conv", {}))
    levels = len(config.channel_mult)
    encoder = 0
    for level in range(levels):
        side = resolution >> level
        for index in range(config.num_res_blocks):
            edm = f"enc.{side}x{side}_block{index}"
            pairs.append((edm, f"encoder.{encoder}.resblock", ADM_RESBLOCK))
            pairs.append((edm, f"encoder.{encoder}.attention", ADM_ATTENTION))
            encoder += 1
        if level != levels - 1:
            below = side >> 1
            pairs.append((f"enc.{below}x{below}_down", f"encoder.{encoder}", ADM_RESBLOCK))
            encoder += 1
    bottom = resolution >> (levels - 1)
    pairs.append((f"dec.{bottom}x{bottom}_in0", "middle.0", ADM_RESBLOCK))
    pairs.append((f"dec.{bottom}x{bottom}_in0", "middle.1", ADM_ATTENTION))
    pairs.append((f"dec.{bottom}x{bottom}_in1", "middle.2", ADM_RESBLOCK))
    decoder = 0
    for level in reversed(range(levels)):
        side = resolution >> level
        for index in range(config.num_res_blocks + 1):
            edm = f"dec.{side}x{side}_block{index}"
            pairs.append((edm, f"decoder.{decoder}.resblock", ADM_RESBLOCK))
            pairs.append((edm, f"decoder.{decoder}.attention", ADM_ATTENTION))
            if level and index == config.num_res_blocks:
                above = side << 1
                pairs.append((f"dec.{above}x{above}_up", f"decoder.{decoder}.resample", ADM_RESBLOCK))
            decoder += 1
    pairs.append(("out_norm", "output_block.norm", {}))
    pairs.append(("out_conv", "output_block.conv", {}))
    return pairs


def _modules_of(network: nn.Module) -> list[tuple[str, str, dict]]:
    resolution = network.data.shape[1]
    if network.name == "songunet":
        return songunet_modules(network.config, resolution)
    if network.name == "adm":
        return adm_modules(network.config, resolution)
    raise ValueError(f"no EDM layout for the {network.name} backbone")


def edm_names(network: nn.Module) -> dict[str, str]:
    """Our state-dict key -> EDM's, for every parameter except the label embedding."""
    pairs = sorted(_modules_of(network), key=lambda pair: -len(pair[1]))  # longest prefix first
    names = {}
    for key in network.state_dict():
        if key.startswith("label_embedding."):
            continue
        for edm, ours, renames in pairs:
            if key.startswith(ours + "."):
                first, _, rest = key[len(ours) + 1:].partition(".")
                names[key] = f"{edm}.{renames.get(first, first)}" + (f".{rest}" if rest else "")
                break
        else:
            raise ValueError(f"{network.name} parameter {key} has no EDM counterpart")
    if len(set(names.values())) != len(names):
        raise ValueError("the EDM name map is not one to one")
    return names


# ---------------------------------------------------------------------------------------------
# Value rewrites
# ---------------------------------------------------------------------------------------------


def qkv_order(network: nn.Module, key: str, rows: int) -> Optional[torch.Tensor]:
    """For a ``qkv`` parameter: the EDM row each of our rows comes from; None for others."""
    if ".qkv." not in f".{key}":
        return None
    channels = rows // 3
    heads = network.config.num_heads if network.name == "songunet" else channels // network.config.num_head_channels
    edm_rows = torch.arange(rows).reshape(heads, channels // heads, 3)  # EDM: [head, channel, qkv]
    ours = (2, 0, 1) if network.name == "songunet" else (0, 2, 1)  # [qkv, head, channel] / [head, qkv, channel]
    return edm_rows.permute(*ours).reshape(-1)


def _label_scale(network: nn.Module) -> float:
    # SongUNet feeds sqrt(label_dim) x one-hot to its label layer; DhariwalUNet the one-hot itself.
    return math.sqrt(network.data.num_classes) if network.name == "songunet" else 1.0


def to_edm_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights under EDM's names and layouts (what EDM's own class would load,
    except its ``resample_filter`` buffers and ``map_augment``)."""
    state = network.state_dict()
    out = {}
    for key, edm in edm_names(network).items():
        value = state[key]
        order = qkv_order(network, key, value.shape[0])
        if order is not None:
            value = value[torch.argsort(order)]
        out[edm] = value.reshape(*value.shape, *([1] * (4 - value.dim()))) if value.dim() == 3 else value.clone()
    if network.data.num_classes is not None:
        table = state["label_embedding.weight"]  # [classes, width]
        out["map_label.weight"] = (table / _label_scale(network)).t().contiguous()
        if network.name == "songunet":
            out["map_label.bias"] = torch.zeros(table.shape[1], dtype=table.dtype)
    return out


def load_edm_state_dict(network: nn.Module, edm: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Fill ``network`` (a songunet or adm of the right architecture) from EDM's state dict."""
    wanted = network.state_dict()
    names = edm_names(network)
    loaded, used = {}, set()
    for key, edm_key in names.items():
        if edm_key not in edm:
            raise EdmLayoutError(f"{source}: EDM parameter {edm_key} is missing (it fills {network.name}'s {key})")
        value = edm[edm_key]
        order = qkv_order(network, key, value.shape[0])
        if order is not None:
            value = value[order]
        if value.numel() != wanted[key].numel():
            raise EdmLayoutError(f"{source}: {edm_key} has shape {tuple(value.shape)}; {network.name}'s {key} needs {tuple(wanted[key].shape)}")
        loaded[key] = value.reshape(wanted[key].shape)
        used.add(edm_key)
    if network.data.num_classes is not None:
        weight = edm["map_label.weight"]  # [width, classes]
        table = weight.t() * _label_scale(network)
        if "map_label.bias" in edm:
            table = table + edm["map_label.bias"][None, :]
        loaded["label_embedding.weight"] = table
        used.update({"map_label.weight", "map_label.bias"})
    check_filters(network, edm, source)
    ignored = {k for k in edm if k.endswith("resample_filter") or k.startswith("map_augment.")}
    unexpected = sorted(set(edm) - used - ignored)
    if unexpected:
        raise EdmLayoutError(f"{source}: EDM parameter {unexpected[0]} has no place in the {network.name} backbone "
                             f"({len(unexpected)} unexpected in all)")
    network.load_state_dict(loaded)


def check_filters(network: nn.Module, edm: dict, source: str) -> None:
    taps = torch.as_tensor(getattr(network.config, "resample_filter", (1, 1)), dtype=torch.float64)
    expected = torch.outer(taps, taps) / taps.sum() ** 2
    for key, value in edm.items():
        if key.endswith("resample_filter") and not torch.allclose(value.reshape(expected.shape).double(), expected):
            raise EdmLayoutError(f"{source}: {key} is not the filter {taps.tolist()} the {network.name} backbone uses")


# ---------------------------------------------------------------------------------------------
# Reading the architecture off EDM's names and shapes
# ---------------------------------------------------------------------------------------------

_ENC_BLOCK = re.compile(r"^enc\.(\d+)x\d+_block(\d+)\.conv0\.weight$")
_ENC_CONV = re.compile(r"^enc\.(\d+)x\d+_conv\.weight$")


def edm_architecture(state: dict[str, torch.Tensor], source: str = "state dict") -> tuple[str, dict, DataSpec]:
    """``(backbone name, backbone options, data spec)`` of an EDM SongUNet / DhariwalUNet state dict."""
    if "map_noise.freqs" in state or any("_aux_skip" in k or "_aux_residual" in k or "_aux_up" in k for k in state):
        raise EdmLayoutError(f"{source}: an EDM NCSN++ network (Fourier embedding, skip / residual paths) has no "
                             "distillkit backbone; DDPM++ (SongUNet) and ADM (DhariwalUNet) networks load")
    convs = [(int(m.group(1)), state[k]) for k in state if (m := _ENC_CONV.match(k))]
    if len(convs) != 1 or "map_layer0.weight" not in state:
        raise EdmLayoutError(f"{source}: not an EDM SongUNet / DhariwalUNet state dict (no enc.<R>x<R>_conv / map_layer0)")
    resolution, first_conv = convs[0]
    channels = state["map_layer0.weight"].shape[1]
    embedding = state["map_layer0.weight"].shape[0]
    blocks: dict[int, set[int]] = {}
    widths: dict[int, int] = {}
    for key in state:
        if m := _ENC_BLOCK.match(key):
            side, index = int(m.group(1)), int(m.group(2))
            blocks.setdefault(side, set()).add(index)
            if index == 0:
                widths[side] = state[key].shape[0]
    sides = sorted(blocks, reverse=True)
    if not sides or sides != [resolution >> level for level in range(len(sides))]:
        raise EdmLayoutError(f"{source}: the encoder's resolutions {sides} do not halve from {resolution}")
    num_blocks = len(blocks[sides[0]])
    channel_mult = tuple(widths[side] // channels for side in sides)
    attention = tuple(side for side in sides if f"enc.{side}x{side}_block0.qkv.weight" in state)
    classes = state["map_label.weight"].shape[1] if "map_label.weight" in state else None
    in_channels = first_conv.shape[1]
    if "out_conv.weight" in state:
        name, out_channels = "adm", state["out_conv.weight"].shape[0]
        options = dict(channels=channels, channel_mult=channel_mult, num_res_blocks=num_blocks,
                       attention_resolutions=attention, num_head_channels=64, dropout=0.0,
                       use_scale_shift_norm=True, resblock_updown=True, num_groups=min(32, channels // 4))
        if embedding != 4 * channels:
            raise EdmLayoutError(f"{source}: the adm backbone's embedding is 4 x channels; this DhariwalUNet has {embedding // channels} x")
    else:
        name = "songunet"
        out_channels = state[f"dec.{resolution}x{resolution}_aux_conv.weight"].shape[0]
        filters = [v for k, v in state.items() if k.endswith("resample_filter")]
        taps = (1, 1) if not filters or filters[0].shape[-1] == 2 else (1, 3, 3, 1)
        options = dict(preset="cifar10", channels=channels, channel_mult=channel_mult, num_blocks=num_blocks,
                       attn_resolutions=attention, dropout=0.0, channel_mult_emb=embedding // channels,
                       resample_filter=taps, num_heads=1)
    if out_channels != in_channels:
        raise EdmLayoutError(f"{source}: the network outputs {out_channels} channels for {in_channels} in "
                             "(a learned-variance iDDPM network); only denoisers with as many outputs as inputs load")
    return name, options, DataSpec((in_channels, resolution, resolution), classes)


def match_edm_normalisation(network: nn.Module) -> None:
    """EDM's GroupNorm uses min(32, C / 4) groups (eps 1e-5 in DhariwalUNet); the adm backbone a
    fixed count. Set EDM's on a network that holds EDM weights, so it computes what EDM does."""
    if network.name != "adm":
        return
    for module in network.modules():
        if isinstance(module, nn.GroupNorm):
            module.num_groups = min(32, module.num_channels // 4)
            module.eps = 1e-5


class EdmLayout:
    """What ``songunet`` and ``adm`` offer for EDM checkpoints (mixed into both classes)."""

    #: EDM's class for this backbone's architecture
    edm_class: str = ""

    @classmethod
    def from_edm_state_dict(cls, state: dict[str, torch.Tensor], source: str = "state dict") -> nn.Module:
        """A network of this backbone holding an EDM state dict (architecture read off its names
        and shapes; ``backbone_options`` holds the options that build the same architecture)."""
        name, options, data = edm_architecture(state, source)
        if name != cls.name:
            raise EdmLayoutError(f"{source}: an EDM {'DhariwalUNet' if name == 'adm' else 'SongUNet'} loads into "
                                 f"the {name} backbone, not {cls.name}")
        network = cls(cls.config_class(**options), data)
        load_edm_state_dict(network, state, source)
        match_edm_normalisation(network)
        network.backbone_options = options
        return network

    def to_edm_state_dict(self) -> dict[str, torch.Tensor]:
        return to_edm_state_dict(self)
