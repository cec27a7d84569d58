"""The building blocks of a U-Net as keys derivable from an `Arch` alone (no model build), the
distinct blocks a whole space can produce, and each block as a runnable module for timing.

A forward of `UNet2DConditionModel` or `FlexUNet2DConditionModel` (same wiring, see
nas/models/flex_unet.py) is the sequence: time embedding, conv_in, per level on the down path its
ResNets (each maybe followed by a transformer) and a downsampler, the mid block's ResNets and
transformers, per level on the up path skip concatenation + ResNet (+ transformer) and an
upsampler, then norm + SiLU + conv_out. With `attention_layout: interleaved` a depth d is d
transformer blocks of depth 1; a half-resolution mid block adds a downsampler after the last level
and an upsampler after the mid block. Each element is one `Block`: its kind and the integers
that fix its weights and input shape. The batch, dtype and device are the table's, not the key's.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

import torch
from torch import nn

from nas.space.build import layer_depths
from nas.space.sample import mirrored_up_attentions
from nas.space.schema import Arch, Settings, Space

NORM_EPS = 1e-5  # GroupNorm eps of every diffusers SD block (FlexUNet's norm_eps default)


@dataclass(frozen=True)
class Block:
    kind: str  # a key of BLOCK_KINDS
    params: tuple[tuple[str, int], ...]  # ordered (name, value): the key's fields

    @property
    def key(self) -> str:
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    def get(self, name: str) -> int:
        return dict(self.params)[name]


def block(kind: str, **params: int) -> Block:
    return Block(kind, tuple((k, int(v)) for k, v in params.items()))


def parse_key(key: str) -> Block:
    """Inverse of `Block.key` (ValueError on a malformed key)."""
    kind, _, rest = key.partition(":")
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block kind {kind!r} (allowed: {', '.join(BLOCK_KINDS)})")
    params = tuple((k, int(v)) for k, v in (item.split("=") for item in rest.split(",") if item))
    return Block(kind, params)


# ---- keys from an architecture -------------------------------------------------------------------


def _text(s: Settings) -> dict[str, int]:
    return {"text": s.text_len, "cross": s.cross_attention_dim, "linear": int(s.use_linear_projection)}


def resnet(s: Settings, cin: int, skip: int, cout: int, temb: int, size: int) -> Block:
    return block("resnet", cin=cin, skip=skip, cout=cout, temb=temb, groups=s.norm_num_groups, size=size)


def transformer(s: Settings, channels: int, heads: int, depth: int, size: int) -> Block:
    return block(
        "transformer", c=channels, heads=heads, depth=depth, size=size, groups=s.norm_num_groups, **_text(s)
    )


def _path(
    s: Settings,
    cins: list[int],
    skips: list[int] | None,
    cout: int,
    temb: int,
    size: int,
    depths,
    heads,
    single: bool = False,  # interleaved layout: a depth d is d one-layer transformers
) -> list[Block]:
    out = []
    for j, (cin, depth) in enumerate(zip(cins, depths)):
        out.append(resnet(s, cin, 0 if skips is None else skips[j], cout, temb, size))
        for layers in [1] * depth if single else [depth] if depth else []:
            out.append(transformer(s, cout, heads, layers, size))
    return out


def arch_blocks(arch: Arch) -> list[Block]:
    """Every block one forward of `arch` runs, in order (repeats kept: the prediction sums them)."""
    s, levels, layout = arch.settings, arch.levels, arch.attention_layout
    single = layout == "interleaved"
    c = [lv.channels for lv in levels]
    heads = [lv.num_heads() for lv in levels]
    c0, temb, last = c[0], 4 * c[0], len(levels) - 1
    size = [s.latent_size // 2**i for i in range(len(levels))]
    half = arch.mid is not None and arch.mid.resolution == "half"
    out = [block("time", c0=c0), block("conv_in", cin=s.latent_channels, c0=c0, size=size[0])]
    for i, lv in enumerate(levels):
        prev = c[i - 1] if i else c0
        cins = [prev] + [c[i]] * (lv.resnets - 1)
        depths = layer_depths(layout, lv.attentions, lv.resnets)
        out += _path(s, cins, None, c[i], temb, size[i], depths, heads[i], single)
        if i < last or half:
            out.append(block("down", c=c[i], size=size[i]))
    if arch.mid is not None:
        depths = layer_depths(layout, arch.mid.attentions, arch.mid.resnets)
        mid_size = size[last] // 2 if half else size[last]
        out += _path(
            s, [c[last]] * arch.mid.resnets, None, c[last], temb, mid_size, depths, heads[last], single
        )
        if half:
            out.append(block("up", c=c[last], size=mid_size))
    for i in reversed(range(len(levels))):
        n = levels[i].resnets + 1
        prev = c[i + 1] if i < last else c[last]
        skips = [c[i]] * (n - 1) + [c[i - 1] if i else c0]
        depths = layer_depths(layout, levels[i].up_attentions, n)
        out += _path(s, [prev] + [c[i]] * (n - 1), skips, c[i], temb, size[i], depths, heads[i], single)
        if i > 0:
            out.append(block("up", c=c[i], size=size[i]))
    out.append(block("conv_out", c0=c0, cout=s.latent_channels, groups=s.norm_num_groups, size=size[0]))
    return out


# ---- every block of a space ----------------------------------------------------------------------


def _heads(ls, channels: int) -> list[int]:
    return ls.heads if ls.heads is not None else [channels // d for d in ls.head_dim]


def space_blocks(space: Space) -> set[Block]:
    """The distinct blocks any point of `space` runs: the union of `arch_blocks` over the space,
    computed per level from the choices a block depends on (itself and its neighbours), so it is
    instant for any size. tests/cost/test_latency_table.py checks it against full enumeration."""
    s, L = space.settings, space.levels
    out: set[Block] = set()
    c0s = L[0].channels
    resolutions = space.mid.resolution if space.mid is not None else ["same"]
    for depth, layout in product(space.depth.values(), space.attention_layout):
        single = layout == "interleaved"
        last = depth - 1
        for i in range(depth):
            ls, size = L[i], s.latent_size // 2**i
            prevs = L[i - 1].channels if i else [0]  # 0: no such level
            nexts = L[i + 1].channels if i < last else [0]
            for c0, cp, c, cn in product(c0s, prevs, ls.channels, nexts):
                if (i == 0 and c0 != c) or (i == 1 and cp != c0):
                    continue  # c0 is level 0's channels
                temb, prev_in = 4 * c0, cp if i else c0
                for r in ls.resnets.values():
                    for a in ls.attentions.values():
                        ups = (
                            ls.up_attentions.values() if ls.up_attentions else [mirrored_up_attentions(a, r)]
                        )
                        for u, h in product(ups, _heads(ls, c)):
                            d_depths = layer_depths(layout, a, r)
                            down = _path(
                                s, [prev_in] + [c] * (r - 1), None, c, temb, size, d_depths, h, single
                            )
                            up_prev = cn if i < last else c
                            skips = [c] * r + [cp if i else c0]
                            u_depths = layer_depths(layout, u, r + 1)
                            up = _path(s, [up_prev] + [c] * r, skips, c, temb, size, u_depths, h, single)
                            out.update(down + up)
                if i < last:
                    out.add(block("down", c=c, size=size))
                if i > 0:
                    out.add(block("up", c=c, size=size))
                if i == last and space.mid is not None:
                    for r, a, h, where in product(
                        space.mid.resnets.values(), space.mid.attentions.values(), _heads(ls, c), resolutions
                    ):
                        mid_size = size // 2 if where == "half" else size
                        depths = layer_depths(layout, a, r)
                        out.update(_path(s, [c] * r, None, c, temb, mid_size, depths, h, single))
                        if where == "half":
                            out.add(block("down", c=c, size=size))
                            out.add(block("up", c=c, size=mid_size))
        for c0 in c0s:
            out.add(block("time", c0=c0))
            out.add(block("conv_in", cin=s.latent_channels, c0=c0, size=s.latent_size))
            out.add(
                block("conv_out", c0=c0, cout=s.latent_channels, groups=s.norm_num_groups, size=s.latent_size)
            )
    return out


# ---- blocks as runnable modules ------------------------------------------------------------------


class _Time(nn.Module):
    def __init__(self, c0: int):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.proj, self.embed = Timesteps(c0, True, 0), TimestepEmbedding(c0, 4 * c0, act_fn="silu")

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.embed(self.proj(timestep).to(self.embed.linear_1.weight.dtype))


class _Resnet(nn.Module):
    """Skip concatenation (up path) + ResNet, as FlexBlock runs them."""

    def __init__(self, cin: int, skip: int, cout: int, temb: int, groups: int):
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        self.skip = skip
        self.resnet = ResnetBlock2D(
            in_channels=cin + skip, out_channels=cout, temb_channels=temb, eps=NORM_EPS, groups=groups
        )

    def forward(self, hidden, skip, temb):
        if self.skip:
            hidden = torch.cat([hidden, skip], dim=1)
        return self.resnet(hidden, temb)


class _Transformer(nn.Module):
    def __init__(self, c: int, heads: int, depth: int, groups: int, cross: int, linear: int):
        super().__init__()
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        self.t = Transformer2DModel(
            heads,
            c // heads,
            in_channels=c,
            num_layers=depth,
            cross_attention_dim=cross,
            norm_num_groups=groups,
            use_linear_projection=bool(linear),
        )

    def forward(self, hidden, text):
        return self.t(hidden, encoder_hidden_states=text, return_dict=False)[0]


def _resample(kind: str, c: int) -> nn.Module:
    from diffusers.models.resnet import Downsample2D, Upsample2D

    if kind == "down":
        return Downsample2D(c, use_conv=True, out_channels=c, padding=1, name="op")
    return Upsample2D(c, use_conv=True, out_channels=c)


def _conv_out(c0: int, cout: int, groups: int) -> nn.Module:
    return nn.Sequential(
        nn.GroupNorm(groups, c0, eps=NORM_EPS), nn.SiLU(), nn.Conv2d(c0, cout, kernel_size=3, padding=1)
    )


def block_module(b: Block, batch: int, device, dtype) -> tuple[nn.Module, tuple]:
    """(module in eval mode on `device`/`dtype`, its inputs) for timing block `b` in isolation."""
    p = dict(b.params)
    gen = torch.Generator().manual_seed(0)

    def x(*shape: int) -> torch.Tensor:
        return torch.randn(batch, *shape, generator=gen).to(device, dtype)

    if b.kind == "time":
        module: nn.Module = _Time(p["c0"])
        inputs: tuple = (torch.full((batch,), 500, dtype=torch.long, device=device),)
    elif b.kind == "conv_in":
        module = nn.Conv2d(p["cin"], p["c0"], kernel_size=3, padding=1)
        inputs = (x(p["cin"], p["size"], p["size"]),)
    elif b.kind == "resnet":
        module = _Resnet(p["cin"], p["skip"], p["cout"], p["temb"], p["groups"])
        hw = (p["size"], p["size"])
        inputs = (x(p["cin"], *hw), x(p["skip"], *hw) if p["skip"] else None, x(p["temb"]))
    elif b.kind == "transformer":
        module = _Transformer(p["c"], p["heads"], p["depth"], p["groups"], p["cross"], p["linear"])
        inputs = (x(p["c"], p["size"], p["size"]), x(p["text"], p["cross"]))
    elif b.kind in ("down", "up"):
        module = _resample(b.kind, p["c"])
        inputs = (x(p["c"], p["size"], p["size"]),)
    else:
        module = _conv_out(p["c0"], p["cout"], p["groups"])
        inputs = (x(p["c0"], p["size"], p["size"]),)
    return module.to(device, dtype).eval(), inputs


BLOCK_KINDS: dict[str, str] = {  # kind -> what it times (the table's README column)
    "time": "sinusoidal timestep projection + TimestepEmbedding MLP",
    "conv_in": "3x3 conv, latents -> first level channels",
    "resnet": "skip concatenation (up path) + ResnetBlock2D",
    "transformer": "Transformer2DModel (self + cross attention + FF, `depth` layers)",
    "down": "Downsample2D (3x3 stride-2 conv)",
    "up": "Upsample2D (nearest x2 + 3x3 conv)",
    "conv_out": "GroupNorm + SiLU + 3x3 conv to latents",
}


def describe(blocks: Any) -> dict[str, int]:
    """Count of blocks per kind (progress lines, table summary)."""
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.kind] = counts.get(b.kind, 0) + 1
    return counts
