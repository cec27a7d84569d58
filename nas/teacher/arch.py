"""Load a trained U-Net as a teacher and read its diffusers config back into the project's `Arch`.

A teacher is one of: a `nas train` run folder (EMA weights where the run has them; its arch.yaml),
a diffusers U-Net folder (config.json + *.safetensors, `UNet2DConditionModel` or
`FlexUNet2DConditionModel`), or a pipeline folder holding such a folder as unet/. Weights are read
from safetensors only (nothing is unpickled). A config the architecture format cannot express is a
one-line NasError naming the file and the field, never a silently different student.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nas.core.errors import NasError
from nas.models.load import find_unet, load_unet
from nas.space.build import FLEX, STOCK, arch_from_dict, layer_depths, load_arch
from nas.space.schema import Arch

# Stock config fields that change what the network computes but that an `Arch` has no field for:
# field -> the value every U-Net built by nas/space/build.py has (diffusers' defaults, SD 1.x/2.x).
STOCK_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
}
FLEX_FIXED: dict[str, Any] = {"norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0}
STOCK_MIDS = {None: None, "UNetMidBlock2D": "plain", "UNetMidBlock2DCrossAttn": "cross"}
DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # type -> has attention
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}


def _per_level(value: Any, levels: int, field: str, where: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != levels:
            raise NasError(f"{where}: {field} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def _depths(entry: Any, count: int, field: str, where: str) -> list[int]:
    """Per-ResNet transformer depths of one block from an int or a per-ResNet list."""
    depths = list(entry) if isinstance(entry, list | tuple) else [int(entry)] * count
    if len(depths) != count:
        raise NasError(f"{where}: {field} gives {len(depths)} depths for {count} ResNets")
    return depths


def _total(depths: list[int], field: str, where: str, layout: str = "stacked") -> int:
    """Total transformer layers, if the layout lays them out as `depths` (else the format cannot)."""
    total = sum(depths)
    expected = layer_depths(layout, total, len(depths))
    if depths != expected:
        rule = (
            "spreads a block's layers evenly, earliest first" if layout == "stacked" else "interleaves them"
        )
        raise NasError(f"{where}: {field} per-ResNet depths {depths} cannot be expressed "
                       f"(nas {rule}: {expected})")  # fmt: skip
    return total


def _check_fixed(config: dict, fixed: dict[str, Any], where: str) -> None:
    for field, expected in fixed.items():
        if field in config and config[field] != expected:
            raise NasError(f"{where}: {field}={config[field]!r} cannot be expressed by a nas architecture "
                           f"(it has {expected!r})")  # fmt: skip


def arch_from_unet_config(config: dict, name: str = "teacher", source: str = "config.json") -> Arch:
    """The `Arch` of a diffusers U-Net config (stock or flex); NasError if the format cannot express it."""
    cls = config.get("_class_name", STOCK)
    try:
        channels = [int(c) for c in config["block_out_channels"]]
        if config.get("out_channels", config["in_channels"]) != config["in_channels"]:
            raise NasError(f"{source}: out_channels={config['out_channels']} differs from "
                           f"in_channels={config['in_channels']} (nas U-Nets predict in latent space)")  # fmt: skip
        if not isinstance(config.get("cross_attention_dim", 768), int):
            raise NasError(f"{source}: cross_attention_dim must be one integer for every block")
        if cls == STOCK:
            levels, mid, attention = _stock_levels(config, channels, source)
            layout = "stacked"
        elif cls == FLEX:
            levels, mid, attention, layout = _flex_levels(config, channels, source)
        else:
            raise NasError(
                f"{source}: _class_name {cls!r} is not a U-Net class of nas (allowed: {STOCK}, {FLEX})"
            )
    except KeyError as exc:
        raise NasError(f"{source}: field {exc.args[0]} is missing") from None
    except (TypeError, ValueError) as exc:
        raise NasError(f"{source}: malformed U-Net config ({exc})") from None
    last = len(levels) - 1
    for i, (level, heads) in enumerate(zip(levels, attention)):
        if level["attentions"] or level["up_attentions"] or (i == last and mid and mid["attentions"]):
            level["heads"] = heads
    settings = {
        "latent_channels": config["in_channels"],
        "latent_size": config.get("sample_size") or 64,
        "cross_attention_dim": config.get("cross_attention_dim", 768),
        "norm_num_groups": config.get("norm_num_groups", 32),
        "use_linear_projection": bool(config.get("use_linear_projection", False)),
    }
    if config.get("time_cond_proj_dim") is not None:  # a guidance embedding (LCM), both classes
        settings["time_cond_proj_dim"] = config["time_cond_proj_dim"]
    data = {"name": name, "settings": settings, "levels": levels, "mid": mid}
    if layout != "stacked":
        data["attention_layout"] = layout
    return arch_from_dict(data, source)


def _stock_levels(config: dict, channels: list[int], where: str):
    _check_fixed(config, STOCK_FIXED, where)
    n = len(channels)
    resnets = [int(r) for r in _per_level(config.get("layers_per_block", 2), n, "layers_per_block", where)]
    layers = _per_level(
        config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", where
    )
    reverse = config.get("reverse_transformer_layers_per_block")
    if reverse is None and any(isinstance(entry, list | tuple) for entry in layers):
        raise NasError(f"{where}: reverse_transformer_layers_per_block is required when "
                       "transformer_layers_per_block lists per-ResNet depths (as diffusers requires)")  # fmt: skip
    up_layers = list(reversed(reverse)) if reverse is not None else layers
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = [int(h) for h in _per_level(heads, n, "attention_head_dim", where)]
    down_types, up_types = list(config["down_block_types"]), list(reversed(config["up_block_types"]))
    if len(down_types) != n or len(up_types) != n:
        raise NasError(f"{where}: down_block_types and up_block_types need one entry per level ({n})")
    levels = []
    for i in range(n):
        kinds = (("down_block_types", down_types[i], DOWN_TYPES), ("up_block_types", up_types[i], UP_TYPES))
        for field, kind, table in kinds:
            if kind not in table:
                raise NasError(f"{where}: {field} {kind!r} cannot be expressed (allowed: {', '.join(table)})")
        down = _depths(layers[i], resnets[i], "transformer_layers_per_block", where)
        up = _depths(up_layers[i], resnets[i] + 1, "reverse_transformer_layers_per_block", where)
        levels.append(
            {
                "channels": channels[i],
                "resnets": resnets[i],
                "attentions": _total(down, "transformer_layers_per_block", where) if DOWN_TYPES[down_types[i]] else 0,
                "up_attentions": _total(up, "reverse_transformer_layers_per_block", where) if UP_TYPES[up_types[i]] else 0,
            }
        )  # fmt: skip
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in STOCK_MIDS:
        raise NasError(f"{where}: mid_block_type {mid_type!r} cannot be expressed "
                       f"(allowed: {', '.join(str(k) for k in STOCK_MIDS)})")  # fmt: skip
    mid = None
    if STOCK_MIDS[mid_type] == "plain":
        mid = {"resnets": 1, "attentions": 0}
    elif STOCK_MIDS[mid_type] == "cross":  # as deep as the last down block's first transformer
        depth = _depths(layers[-1], resnets[-1], "transformer_layers_per_block", where)[0]
        if (
            depth != 1
        ):  # the format spreads a mid block's layers over its ResNets: 2 ResNets, 2 layers = 1 + 1
            raise NasError(f"{where}: transformer_layers_per_block {depth} in the mid block cannot be expressed "
                           "(allowed: 1; the format puts a mid block's second layer after its second ResNet)")  # fmt: skip
        mid = {"resnets": 2, "attentions": depth}
    return levels, mid, heads


def _flex_levels(config: dict, channels: list[int], where: str):
    _check_fixed(config, FLEX_FIXED, where)
    n = len(channels)
    resnets = [int(r) for r in _per_level(config["down_resnets"], n, "down_resnets", where)]
    down = _per_level(config["down_attention"], n, "down_attention", where)
    up = _per_level(config["up_attention"], n, "up_attention", where)
    heads = [int(h) for h in _per_level(config["attention_heads"], n, "attention_heads", where)]
    lay = "interleaved" if config.get("single_layer_transformers") else "stacked"
    levels = [
        {
            "channels": channels[i],
            "resnets": resnets[i],
            "attentions": _total(_depths(down[i], resnets[i], "down_attention", where), "down_attention", where, lay),
            "up_attentions": _total(_depths(up[i], resnets[i] + 1, "up_attention", where), "up_attention", where, lay),
        }
        for i in range(n)
    ]  # fmt: skip
    mid_attention = config.get("mid_attention")
    mid: dict[str, Any] | None = None
    if mid_attention is not None:
        depths = [int(d) for d in mid_attention]
        mid = {"resnets": len(depths), "attentions": _total(depths, "mid_attention", where, lay)}
        if config.get("mid_block_half_resolution"):
            mid["resolution"] = "half"
    return levels, mid, heads, lay


# ---- loading -------------------------------------------------------------------------------------


def _unet_folder(path: Path, what: str) -> tuple[Path, Arch | None]:
    """(folder with config.json + safetensors, the run's own arch if `path` is a run folder)."""
    from nas.core.runfolder import ARCH

    found = find_unet(path, what)
    if found.run is not None and (found.run / ARCH).is_file():
        return found.folder, load_arch(found.run / ARCH)
    return found.folder, None


def read_unet_config(folder: Path) -> dict:
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NasError(f"{config_file}: cannot read ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise NasError(f"{config_file}: not a JSON object")
    return config


def teacher_arch(path: str | Path, what: str = "teacher") -> tuple[Path, Arch]:
    """(weights folder, Arch) of a teacher without loading its weights (for --dry-run and checks)."""
    folder, arch = _unet_folder(Path(path), what)
    config = read_unet_config(folder)
    from_config = arch_from_unet_config(config, name=Path(path).name, source=str(folder / "config.json"))
    return folder, arch if arch is not None else from_config


def load_teacher(path: str | Path, what: str = "teacher") -> tuple[torch.nn.Module, Arch]:
    """The teacher U-Net (eval mode, frozen) and its architecture; NasError naming the path."""
    folder, arch = teacher_arch(path, what)
    return load_unet(folder), arch
