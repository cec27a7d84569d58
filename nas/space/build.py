"""Architecture -> diffusers model config -> model.

Where attention layers sit: a block with R ResNets and A transformer layers gives ResNet i d_i
transformer layers right after it, d = `layer_depths(layout, A, R)`. `stacked` (default):
d = `spread(A, R)` (as even as possible, the remainder to the earliest ResNets), the d_i layers in
one transformer; with every d_i >= 1 this is exactly how `UNet2DConditionModel` lays out a
cross-attention block (one transformer per ResNet, `transformer_layers_per_block` deep).
`interleaved` (DeciDiffusion's U-Net-NAS): one layer after each ResNet in turn, the surplus after
the last one, each layer a transformer of its own. A block with 0 < A < R, a transformer split into
single layers, a mid block other than (1 ResNet, no attention) or (2 ResNets, 1 transformer layer,
whose depth the last down block's transformers must share), or a mid block at half resolution
cannot be expressed by the stock class; those points are built as `FlexUNet2DConditionModel`, our
`ModelMixin` + `ConfigMixin` class made of the same diffusers blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from nas.core.config import load, validate
from nas.models.load import FLEX, STOCK, unet_class
from nas.space.schema import Arch


def spread(total: int, slots: int) -> list[int]:
    """Split `total` layers over `slots` positions as evenly as possible, earliest first."""
    base, extra = divmod(total, slots)
    return [base + (1 if i < extra else 0) for i in range(slots)]


def interleave(total: int, slots: int) -> list[int]:
    """One layer after each of the first `slots - 1` positions in turn, the rest after the last:
    `itertools.zip_longest(resnets, attentions)` in Deci's flexible_unet."""
    head = [1 if i < total else 0 for i in range(slots - 1)]
    return [*head, max(0, total - (slots - 1))]


def layer_depths(layout: str, total: int, slots: int) -> list[int]:
    """Transformer layers after each of `slots` ResNets for `total` layers (see the module doc)."""
    return interleave(total, slots) if layout == "interleaved" else spread(total, slots)


def load_arch(path) -> Arch:
    """Read and validate an architecture YAML file (NasError on any problem)."""
    return load(Arch, path)


def arch_from_dict(data: dict, source: str = "<architecture>") -> Arch:
    """Validate a plain dict as an architecture (NasError naming `source` and the field)."""
    return validate(Arch, data, source)


def _common(arch: Arch) -> dict[str, Any]:
    s = arch.settings
    config: dict[str, Any] = {
        "sample_size": s.latent_size,
        "in_channels": s.latent_channels,
        "out_channels": s.latent_channels,
        "block_out_channels": [lv.channels for lv in arch.levels],
        "cross_attention_dim": s.cross_attention_dim,
        "norm_num_groups": s.norm_num_groups,
        "use_linear_projection": s.use_linear_projection,
    }
    if s.time_cond_proj_dim is not None:  # the guidance embedding (LCM); both classes take the key
        config["time_cond_proj_dim"] = s.time_cond_proj_dim
    return config


def stock_config(arch: Arch) -> dict[str, Any] | None:
    """Config for diffusers' `UNet2DConditionModel`, or None if the stock class cannot express it."""
    if arch.mid is not None and arch.mid.resolution == "half":
        return None  # the stock mid block works at the lowest level's resolution
    layout = arch.attention_layout
    down: list[list[int] | None] = []
    up: list[list[int] | None] = []
    for lv in arch.levels:
        d = layer_depths(layout, lv.attentions, lv.resnets)
        u = layer_depths(layout, lv.up_attentions, lv.resnets + 1)
        if (lv.attentions and min(d) == 0) or (lv.up_attentions and min(u) == 0):
            return None  # fewer transformer layers than ResNets: stock pairs one with each ResNet
        if layout == "interleaved" and max(d + u) > 1:
            return None  # single-layer transformers: stock has one (deep) transformer per ResNet
        down.append(d if lv.attentions else None)
        up.append(u if lv.up_attentions else None)

    mid_depth = 0
    if arch.mid is None:
        mid_type = None
    elif (arch.mid.resnets, arch.mid.attentions) == (1, 0):
        mid_type = "UNetMidBlock2D"
    elif (arch.mid.resnets, arch.mid.attentions) == (2, 1):
        # diffusers' cross-attention mid block has its one transformer after the first ResNet; a
        # second layer goes after the second ResNet in both layouts (spread / interleave), which
        # only FlexUNet builds
        mid_type, mid_depth = "UNetMidBlock2DCrossAttn", 1
    else:
        return None
    # The stock mid block is as deep as the first layer of the last down block.
    if mid_depth and down[-1] is not None and down[-1][0] != mid_depth:
        return None

    # Depths of blocks without attention are unused by DownBlock2D/UpBlock2D; pick them so the
    # config stays compact (and the last one feeds the mid block).
    last = len(arch.levels) - 1
    full_down, full_up = [], []
    for i, lv in enumerate(arch.levels):
        level_down, level_up = down[i], up[i]
        if level_down is not None:
            fill = level_down[0]
        elif i == last and mid_depth:
            fill = mid_depth
        elif level_up is not None:
            fill = level_up[0]
        else:
            fill = 1
        full_down.append(level_down or [fill] * lv.resnets)
        full_up.append(level_up or [full_down[i][0]] * (lv.resnets + 1))
    uniform = all(len(set(b)) == 1 for b in full_down + full_up) and all(
        u[0] == d[0] for u, d in zip(full_up, full_down)
    )

    def compact(values: list[int]) -> int | list[int]:
        return values[0] if len(set(values)) == 1 else values

    config = _common(arch)
    config.update(
        {
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down],
            "up_block_types": ["CrossAttnUpBlock2D" if u else "UpBlock2D" for u in reversed(up)],
            "mid_block_type": mid_type,
            "layers_per_block": compact([lv.resnets for lv in arch.levels]),
            # diffusers' `attention_head_dim` is in fact the number of heads: UNet2DConditionModel sets
            # `num_attention_heads = num_attention_heads or attention_head_dim` (models/unets/
            # unet_2d_condition.py; the misnaming is diffusers issue #2011).
            "attention_head_dim": compact(_heads_per_level(arch)),
        }
    )
    if uniform:
        config["transformer_layers_per_block"] = compact([d[0] for d in full_down])
    else:
        config["transformer_layers_per_block"] = full_down
        config["reverse_transformer_layers_per_block"] = list(reversed(full_up))
    return config


def _heads_per_level(arch: Arch) -> list[int]:
    """Head count per level; levels without attention borrow a neighbour's (unused, keeps configs
    compact: SD 1.5's is `attention_head_dim: 8`). The mid block uses the lowest level's heads."""
    mid_attention = arch.mid is not None and arch.mid.attentions > 0
    last = len(arch.levels) - 1
    heads = [
        lv.num_heads() if (lv.attentions or lv.up_attentions or (i == last and mid_attention)) else None
        for i, lv in enumerate(arch.levels)
    ]
    known = [h for h in heads if h is not None] or [1]
    return [h if h is not None else known[0] for h in heads]


def flex_config(arch: Arch) -> dict[str, Any]:
    """Config for `nas.models.FlexUNet2DConditionModel` (expresses every point of every space)."""
    config = _common(arch)
    layout = arch.attention_layout
    config.update(
        {
            "down_resnets": [lv.resnets for lv in arch.levels],
            "down_attention": [layer_depths(layout, lv.attentions, lv.resnets) for lv in arch.levels],
            "up_attention": [layer_depths(layout, lv.up_attentions, lv.resnets + 1) for lv in arch.levels],
            "attention_heads": _heads_per_level(arch),
            "mid_attention": (
                layer_depths(layout, arch.mid.attentions, arch.mid.resnets) if arch.mid is not None else None
            ),
        }
    )
    # Keys only where they differ from the class defaults: configs of other points stay as they were.
    if layout == "interleaved":
        config["single_layer_transformers"] = True
    if arch.mid is not None and arch.mid.resolution == "half":
        config["mid_block_half_resolution"] = True
    return config


def unet_config(arch: Arch, force_flex: bool = False) -> tuple[str, dict[str, Any]]:
    """(class name, config dict): the stock class wherever it can express the point."""
    if not force_flex:
        config = stock_config(arch)
        if config is not None:
            return STOCK, config
    return FLEX, flex_config(arch)


def build_unet(arch: Arch, force_flex: bool = False, device: str | torch.device | None = None):
    """Instantiate the U-Net for `arch` (random init). `device="meta"` builds without memory."""
    class_name, config = unet_config(arch, force_flex=force_flex)
    cls = unet_class(class_name)
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return cls.from_config(config)
    model = cls.from_config(config)
    return model.to(device) if device is not None else model
