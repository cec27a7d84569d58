"""Points of a space: sample one (define-by-run), rebuild one from its parameters, count them.

A chooser is anything with Optuna's two methods `suggest_int(name, low, high)` and
`suggest_categorical(name, choices)`: an `optuna.Trial` works as is (this module never imports
Optuna), `FixedChoices` replays a parameter dict, `RandomChoices` draws uniformly from a seed.
Parameters exist only for levels that exist and for heads only where a level has attention.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from math import ceil, prod
from pathlib import Path
from typing import Any, Protocol

from nas.core.config import load, validate
from nas.core.errors import NasError
from nas.space.schema import Arch, ArchLevel, IntRange, LevelSpace, Space


class Chooser(Protocol):
    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


class FixedChoices:
    """Replays given parameters; a missing or out-of-range one is an error naming it."""

    def __init__(self, params: dict[str, Any], source: str = "<params>"):
        self.params, self.source = dict(params), source
        self.used: set[str] = set()

    def _get(self, name: str) -> Any:
        if name not in self.params:
            raise NasError(f"{self.source}: missing parameter {name}")
        self.used.add(name)
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int) -> int:
        value = self._get(name)
        if not isinstance(value, int) or not low <= value <= high:
            raise NasError(f"{self.source}: {name}={value!r} is outside the space (allowed: {low}..{high})")
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        value = self._get(name)
        if value not in choices:
            raise NasError(f"{self.source}: {name}={value!r} is outside the space (allowed: {list(choices)})")
        return value


class RandomChoices:
    """Uniform random choices from a seeded generator (tests, random search, smoke runs)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def suggest_int(self, name: str, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self.rng.choice(list(choices))


def load_space(path: str | Path) -> Space:
    """Read and validate a search-space YAML file (NasError on any problem)."""
    return load(Space, path)


def mirrored_up_attentions(attentions: int, resnets: int) -> int:
    """Up-path transformer layers when the up path mirrors the down path: the same number of
    transformer layers per ResNet, the up path having one more ResNet (rounded up)."""
    return ceil(attentions * (resnets + 1) / resnets)


def mirror_message(i: int, level: ArchLevel, space_name: str) -> str:
    """Why level `i` of an architecture is not a point of a space whose up path mirrors the down
    path there: the value it must have, the arithmetic, and the other way out."""
    r, a, up = level.resnets, level.attentions, level.up_attentions
    expected = mirrored_up_attentions(a, r)
    given = "" if "up_attentions" in level.model_fields_set else ", the default when the key is left out"
    return (
        f"levels.{i}.up_attentions must mirror the down path in space {space_name}: expected {expected},"
        f" got {up}{given} (the up path's resnets + 1 = {r + 1} ResNet layers keep the down path's"
        f" {a} attentions per {r} resnets: ceil({a} * {r + 1} / {r}) = {expected});"
        f" or give levels.{i}.up_attentions {{min, max}} in the space to search it"
    )


def _int(chooser: Chooser, name: str, r: IntRange) -> int:
    return r.min if r.min == r.max else chooser.suggest_int(name, r.min, r.max)


def _cat(chooser: Chooser, name: str, choices: list[Any]) -> Any:
    return choices[0] if len(choices) == 1 else chooser.suggest_categorical(name, choices)


def sample_arch(space: Space, chooser: Chooser, name: str | None = None) -> Arch:
    """Draw one architecture (define-by-run). Fixed values (single choice) are not suggested."""
    depth = _int(chooser, "depth", space.depth)
    layout = _cat(chooser, "attention_layout", space.attention_layout)
    levels = []
    for i in range(depth):
        ls: LevelSpace = space.levels[i]
        level: dict[str, Any] = {
            "channels": _cat(chooser, f"l{i}.channels", ls.channels),
            "resnets": _int(chooser, f"l{i}.resnets", ls.resnets),
            "attentions": _int(chooser, f"l{i}.attentions", ls.attentions),
        }
        if ls.up_attentions is not None:
            level["up_attentions"] = _int(chooser, f"l{i}.up_attentions", ls.up_attentions)
        else:
            level["up_attentions"] = mirrored_up_attentions(level["attentions"], level["resnets"])
        levels.append(level)
    mid = None
    if space.mid is not None:
        use_mid = True
        if space.mid.optional:
            use_mid = bool(_cat(chooser, "mid", [True, False]))
        if use_mid:
            mid = {
                "resnets": _int(chooser, "mid.resnets", space.mid.resnets),
                "attentions": _int(chooser, "mid.attentions", space.mid.attentions),
                "resolution": _cat(chooser, "mid.resolution", space.mid.resolution),
            }
    # Heads last: a level needs them if it has attention, the lowest one also for the mid block's.
    for i, level in enumerate(levels):
        ls = space.levels[i]
        if needs_heads(level, mid if i == depth - 1 else None):
            level[ls.head_key] = _cat(chooser, f"l{i}.{ls.head_key}", ls.head_choices)
    data = {
        "name": name or f"{space.name}-{arch_digest(levels, mid, layout)}",
        "settings": space.settings.model_dump(),
        "levels": levels,
        "mid": mid,
        "attention_layout": layout,
    }
    return validate(Arch, data, f"space {space.name}: sampled architecture")


def needs_heads(level: dict[str, Any], mid: dict[str, Any] | None) -> bool:
    """Whether a level's head choice shapes the model: its own attention, or (lowest level) the
    mid block's, which uses the lowest level's heads as in `UNet2DConditionModel`."""
    return bool(level["attentions"] or level["up_attentions"] or (mid and mid["attentions"]))


def arch_digest(levels: list[dict], mid: dict | None, layout: str = "stacked") -> str:
    """Short readable id: channels/resnets/attn per level, e.g. 32r1a0-64r2a1_m1a1; `h` after the
    mid block at half resolution, `_i` for the interleaved layout (defaults add nothing)."""
    parts = [f"{lv['channels']}r{lv['resnets']}a{lv['attentions']}u{lv['up_attentions']}" for lv in levels]
    tail = f"m{mid['resnets']}a{mid['attentions']}" if mid else "nomid"
    if mid and mid.get("resolution", "same") == "half":
        tail += "h"
    return "-".join(parts) + "_" + tail + ("_i" if layout == "interleaved" else "")


def arch_to_params(space: Space, arch: Arch, source: str = "<architecture>") -> dict[str, Any]:
    """The parameters under which `sample_arch` yields `arch` (to enqueue a known architecture).
    NasError if the architecture is not a point of the space."""
    params: dict[str, Any] = {}
    if arch.settings != space.settings:
        raise NasError(f"{source}: settings differ from space {space.name}'s settings")
    depth = len(arch.levels)
    if not space.depth.min <= depth <= space.depth.max:
        raise NasError(
            f"{source}: {depth} levels is outside the space (allowed: {space.depth.min}..{space.depth.max})"
        )
    if space.depth.min != space.depth.max:
        params["depth"] = depth
    if arch.attention_layout not in space.attention_layout:
        raise NasError(
            f"{source}: attention_layout {arch.attention_layout} is outside the space"
            f" (allowed: {', '.join(space.attention_layout)})"
        )
    params["attention_layout"] = arch.attention_layout
    for i, (lv, ls) in enumerate(zip(arch.levels, space.levels)):
        params[f"l{i}.channels"] = lv.channels
        params[f"l{i}.resnets"] = lv.resnets
        params[f"l{i}.attentions"] = lv.attentions
        if ls.up_attentions is not None:
            params[f"l{i}.up_attentions"] = lv.up_attentions
        elif lv.up_attentions != mirrored_up_attentions(lv.attentions, lv.resnets):
            raise NasError(f"{source}: {mirror_message(i, lv, space.name)}")
        lowest_mid = arch.mid.model_dump() if arch.mid is not None and i == depth - 1 else None
        if needs_heads(lv.model_dump(), lowest_mid):
            value = getattr(lv, ls.head_key)
            if value is None:
                raise NasError(f"{source}: levels.{i} must give {ls.head_key} for space {space.name}")
            params[f"l{i}.{ls.head_key}"] = value
    if space.mid is None:
        if arch.mid is not None:
            raise NasError(f"{source}: space {space.name} has no mid block")
    else:
        if space.mid.optional:
            params["mid"] = arch.mid is not None
        elif arch.mid is None:
            raise NasError(f"{source}: space {space.name} requires a mid block")
        if arch.mid is not None:
            params["mid.resnets"] = arch.mid.resnets
            params["mid.attentions"] = arch.mid.attentions
            params["mid.resolution"] = arch.mid.resolution
    chooser = FixedChoices(params, source)
    rebuilt = sample_arch(space, chooser, name=arch.name)
    if canonical(rebuilt) != canonical(arch):
        raise NasError(f"{source}: not a point of space {space.name}")
    return {k: v for k, v in params.items() if k in chooser.used}


def canonical(arch: Arch) -> dict[str, Any]:
    """The architecture as data without its name, and without head choices of levels that have
    no attention (they change nothing in the model)."""
    data = arch.model_dump(exclude={"name"})
    last = len(data["levels"]) - 1
    for i, level in enumerate(data["levels"]):
        if not needs_heads(level, data["mid"] if i == last else None):
            level["heads"] = level["head_dim"] = None
    return data


def _level_counts(ls: LevelSpace) -> tuple[int, int]:
    """Distinct architectures of one level: (its head choice matters only where the level has
    attention, it matters always). The second is the lowest level under a mid block with
    attention, which uses that level's heads. Arithmetic over the ranges, nothing enumerated."""
    channels, resnets, heads = len(ls.channels), _span(ls.resnets), len(ls.head_choices)
    if ls.up_attentions is None:  # mirrored: the up path has attention exactly when the down path has
        pairs, bare = _span(ls.attentions), int(ls.attentions.min == 0)
    else:
        pairs = _span(ls.attentions) * _span(ls.up_attentions)
        bare = int(ls.attentions.min == 0 and ls.up_attentions.min == 0)  # (0, 0): no attention
    per_layout = channels * resnets
    return per_layout * (bare + (pairs - bare) * heads), per_layout * pairs * heads


def _span(r: IntRange) -> int:
    return r.max - r.min + 1


def space_size(space: Space) -> int:
    """Number of distinct architectures in the space (as `canonical` tells them apart), by
    arithmetic: a product over levels per depth, summed over depths. Instant for any size."""
    mid_plain, mid_attention = 1, 0  # mid-block configurations without / with attention
    if space.mid is not None:
        m = space.mid
        no_attention = int(m.attentions.min == 0)
        places = len(m.resolution)
        mid_plain = int(m.optional) + _span(m.resnets) * no_attention * places
        mid_attention = _span(m.resnets) * (_span(m.attentions) - no_attention) * places
    counts = [_level_counts(ls) for ls in space.levels]
    total = 0
    for depth in space.depth.values():
        upper = prod(plain for plain, _ in counts[: depth - 1])
        plain, always = counts[depth - 1]
        total += upper * (mid_plain * plain + mid_attention * always)
    # Each layout is counted as its own point, also where it builds the same model (no attention,
    # or at most one layer per ResNet).
    return total * len(space.attention_layout)


def extreme_archs(space: Space) -> list[tuple[int, Arch, Arch]]:
    """(depth, smallest, largest) per depth and mid resolution: every cost grows with each count,
    channel and the interleaved layout (one GroupNorm and two projections per layer), so the
    smallest point takes every minimum and `stacked`, the largest every maximum and `interleaved`.
    A half-resolution mid block has more weights (a downsampler and an upsampler) but fewer MACs
    than the same block at full resolution, so each mid resolution of the space gets its own pair."""
    out = []
    layouts = space.attention_layout
    resolutions = space.mid.resolution if space.mid is not None else ["same"]
    for depth, resolution in ((d, r) for d in space.depth.values() for r in resolutions):
        lo: dict[str, Any] = {"depth": depth, "mid": False, "mid.resolution": resolution}
        hi: dict[str, Any] = {"depth": depth, "mid": True, "mid.resolution": resolution}
        lo["attention_layout"] = "stacked" if "stacked" in layouts else layouts[0]
        hi["attention_layout"] = "interleaved" if "interleaved" in layouts else layouts[0]
        for i in range(depth):
            ls = space.levels[i]
            lo.update(
                {
                    f"l{i}.channels": min(ls.channels),
                    f"l{i}.resnets": ls.resnets.min,
                    f"l{i}.attentions": ls.attentions.min,
                }
            )
            hi.update(
                {
                    f"l{i}.channels": max(ls.channels),
                    f"l{i}.resnets": ls.resnets.max,
                    f"l{i}.attentions": ls.attentions.max,
                }
            )
            if ls.up_attentions is not None:
                lo[f"l{i}.up_attentions"] = ls.up_attentions.min
                hi[f"l{i}.up_attentions"] = ls.up_attentions.max
            # Head count does not change params or MACs (heads x head size = channels).
            lo[f"l{i}.{ls.head_key}"] = ls.head_choices[0]
            hi[f"l{i}.{ls.head_key}"] = ls.head_choices[0]
        if space.mid is not None:
            lo.update({"mid.resnets": space.mid.resnets.min, "mid.attentions": space.mid.attentions.min})
            hi.update({"mid.resnets": space.mid.resnets.max, "mid.attentions": space.mid.attentions.max})
            lo["mid"] = not space.mid.optional
        tag = f"d{depth}" + ("" if resolution == "same" else f"-mid-{resolution}")
        smallest = sample_arch(space, _Lenient(lo), name=f"{space.name}-smallest-{tag}")
        largest = sample_arch(space, _Lenient(hi), name=f"{space.name}-largest-{tag}")
        out.append((depth, smallest, largest))
    return out


class _Lenient(FixedChoices):
    """FixedChoices that ignores parameters the define-by-run path never asks for."""
