"""Schemas of the two YAML formats: a search space (choices) and an architecture (one point).

Levels are listed highest resolution first. Level i works at latent_size / 2**i. On the down path a
level has `resnets` ResNet layers and `attentions` transformer layers; on the up path it has
`resnets + 1` ResNet layers (one per skip connection at that resolution, as in every SD U-Net) and
`up_attentions` transformer layers. ResNet and attention counts are independent (DeciDiffusion's
U-Net-NAS); see nas/space/build.py for where attention layers sit (`attention_layout`).

Two optional keys reproduce DeciDiffusion 1.0's U-Net-NAS exactly (Deci's flexible_unet, published
with the model at huggingface.co/Deci/DeciDiffusion-v1-0): `attention_layout: interleaved` and the
mid block's `resolution: half`. Their defaults (`stacked`, `same`) are the SD wiring every file
without them means.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nas.core import limits as L
from nas.core.config import Strict
from nas.deploy.choices import Precision, Runtime, precision_error
from nas.space.distill import DistillConfig

METRICS = ("proxy_loss", "latency_ms", "params", "macs")  # what objectives and budgets may name

# How a block's transformer layers sit among its ResNets (nas/space/build.py `layer_depths`):
# stacked: spread over the ResNets as evenly as possible, the layers after one ResNet in one
#   Transformer2DModel (SD 1.5, SDXL; the default);
# interleaved: single-layer Transformer2DModels alternating with the ResNets, any surplus after the
#   last ResNet (DeciDiffusion's U-Net-NAS: each with its own GroupNorm and proj_in/proj_out).
AttentionLayout = Literal["stacked", "interleaved"]
ATTENTION_LAYOUTS = ("stacked", "interleaved")
# Where the mid block works: same: at the lowest level's resolution (SD); half: one resolution lower,
# the lowest level then ends with a downsampler (its output not a skip) and the mid block with an
# upsampler (DeciDiffusion's U-Net-NAS: 8x8 for 64x64 latents).
MidResolution = Literal["same", "half"]
MID_RESOLUTIONS = ("same", "half")


def check_latent_size(latent_size: int, levels: int, half: bool, what: str, note: str = "") -> None:
    """The one divisibility rule: a U-Net of `levels` levels downsamples levels - 1 times, once more
    with a half-resolution mid block, so the latent side must divide by 2**that (ValueError else)."""
    factor = 2 ** (levels - (0 if half else 1))
    if latent_size % factor:
        raise ValueError(
            f"settings.latent_size={latent_size} must be divisible by"
            f" 2**({what}{'' if half else '-1'})={factor}{note}"
        )


class Settings(Strict):
    """Fixed for every point of a space; must match the VAE and text encoder the U-Net is used with."""

    # Upper bounds: nas/core/limits.py (each with the figures of real models it leaves room for).
    latent_channels: int = Field(4, ge=1, le=L.MAX_LATENT_CHANNELS)  # VAE latent channels (SD: 4)
    latent_size: int = Field(64, ge=1, le=L.MAX_LATENT_SIZE)  # latent side (SD 1.5: 512 px / 8 = 64)
    # text encoder hidden size (CLIP ViT-L/14: 768)
    cross_attention_dim: int = Field(768, ge=1, le=L.MAX_CROSS_ATTENTION_DIM)
    text_len: int = Field(77, ge=1, le=L.MAX_TEXT_LEN)  # tokens per caption (CLIP: 77)
    # GroupNorm groups (SD: 32); divides every channel count
    norm_num_groups: int = Field(32, ge=1, le=L.MAX_NORM_GROUPS)
    use_linear_projection: bool = False  # transformer proj_in/out as Linear (SD 2.x) or 1x1 conv (SD 1.x)
    # guidance-scale embedding width (diffusers' time_cond_proj_dim; LCM: 256): the U-Net takes the
    # guidance weight w as `timestep_cond` (nas/models/guidance.py), one call per sampling step;
    # null: none. >= 4: the embedding needs two frequencies
    time_cond_proj_dim: int | None = Field(None, ge=4, le=L.MAX_CHANNELS)


class IntRange(Strict):
    """An inclusive integer range, written {min: A, max: B}. The field holding it bounds `max`
    (`_within`); the cap here only keeps a typo from reaching arithmetic on a huge number."""

    min: int = Field(ge=0, le=L.MAX_STEPS)
    max: int = Field(ge=0, le=L.MAX_STEPS)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self

    def values(self) -> list[int]:
        return list(range(self.min, self.max + 1))


def _within(r: IntRange, what: str, low: int, high: int) -> IntRange:
    """`r` inside low..high, or a ValueError naming the field and the allowed range."""
    if r.min < low or r.max > high:
        raise ValueError(f"{what} must lie in {low}..{high}, got {{min: {r.min}, max: {r.max}}}")
    return r


# Choice lists of a level: field -> largest allowed value (see nas/core/limits.py).
CHOICE_LIMITS = {"channels": L.MAX_CHANNELS, "heads": L.MAX_HEADS, "head_dim": L.MAX_CHANNELS}
# Range fields of a level and of the mid block: field -> (smallest min, largest max).
RANGE_LIMITS = {
    "resnets": (1, L.MAX_RESNETS),  # a level needs a ResNet layer
    "attentions": (0, L.MAX_ATTENTIONS),  # 0 = no attention
    "up_attentions": (0, L.MAX_ATTENTIONS),
}
MID_LIMITS = {"resnets": (1, L.MAX_MID_RESNETS), "attentions": (0, L.MAX_ATTENTIONS)}


def _positive_unique(values: list[int], what: str, high: int) -> list[int]:
    if not values:
        raise ValueError(f"{what}: give at least one choice")
    if len(values) > L.MAX_CHOICES:
        raise ValueError(f"{what}: at most {L.MAX_CHOICES} choices, got {len(values)}")
    if any(not 1 <= v <= high for v in values):
        raise ValueError(f"{what}: every choice must be an integer in 1..{high}, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}: choices repeat, got {values}")
    return values


def _unique_names(values: list[str], what: str, allowed: tuple[str, ...]) -> list[str]:
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{what}: give each choice once, at least one (allowed: {', '.join(allowed)})")
    return values


class LevelSpace(Strict):
    """The choices for one resolution level."""

    channels: list[int]  # choices of output channels
    resnets: IntRange  # ResNet layers on the down path (up path: one more)
    attentions: IntRange  # transformer layers on the down path; 0 = none
    up_attentions: IntRange | None = None  # searched separately if given; else mirrors the down path
    heads: list[int] | None = None  # choices of attention head count ...
    head_dim: list[int] | None = None  # ... or of head size (channels per head); give exactly one

    @field_validator("channels", "heads", "head_dim")
    @classmethod
    def _choices(cls, v: list[int] | None, info) -> list[int] | None:
        return None if v is None else _positive_unique(v, info.field_name, CHOICE_LIMITS[info.field_name])

    @field_validator("resnets", "attentions", "up_attentions")
    @classmethod
    def _ranges(cls, v: IntRange | None, info) -> IntRange | None:
        return None if v is None else _within(v, info.field_name, *RANGE_LIMITS[info.field_name])

    @model_validator(mode="after")
    def _one_head_spec(self) -> LevelSpace:
        if (self.heads is None) == (self.head_dim is None):
            raise ValueError("give exactly one of heads (count) or head_dim (size)")
        return self

    @property
    def head_choices(self) -> list[int]:
        return self.heads if self.heads is not None else self.head_dim  # type: ignore[return-value]

    @property
    def head_key(self) -> str:
        return "heads" if self.heads is not None else "head_dim"


class MidSpace(Strict):
    """The bottleneck block at the lowest resolution."""

    resnets: IntRange = IntRange(min=2, max=2)  # SD 1.5: 2 ResNets around one transformer
    attentions: IntRange = IntRange(min=1, max=1)
    optional: bool = False  # may the search drop the mid block altogether?
    resolution: list[MidResolution] = ["same"]  # choices (see MidResolution); a point's mid takes one

    @field_validator("resnets", "attentions")
    @classmethod
    def _ranges(cls, v: IntRange, info) -> IntRange:
        # resnets.min >= 1: use optional: true to allow no mid block
        return _within(v, info.field_name, *MID_LIMITS[info.field_name])

    @field_validator("resolution")
    @classmethod
    def _resolutions(cls, v: list[str]) -> list[str]:
        return _unique_names(v, "resolution", MID_RESOLUTIONS)


class Objective(Strict):
    metric: Literal["proxy_loss", "latency_ms", "params", "macs"]
    direction: Literal["minimize", "maximize"] = "minimize"


class Budgets(Strict):
    """Upper bounds; a point over any of them is rejected before training."""

    latency_ms: float | None = Field(None, gt=0)  # median forward latency, measured (see `latency:`)
    params: float | None = Field(None, gt=0)  # parameter count
    macs: float | None = Field(None, gt=0)  # multiply-accumulates per forward, attention included


class LatencySetup(Strict):
    """How the search gets latency (batch 1 at the space's latent size unless set): measured whole
    per trial on the machine it runs on (`source: measure`), or predicted from a per-device lookup
    table made by `nas latency-table` (`source: table`: no forward pass, immune to load)."""

    source: Literal["measure", "table"] = "measure"
    table: str | None = None  # table JSON for source: table (relative to the space file)
    # for source: table, a part of the GPU name / CPU model the table must be measured on, e.g. A10G
    device_name: str | None = None

    device: str = "cpu"  # torch device string: cpu, cuda, cuda:1, mps
    # latents per forward (classifier-free guidance doubles it in practice)
    batch: int = Field(1, ge=1, le=L.MAX_LATENCY_BATCH)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    # untimed forwards first (allocator, caches, compile)
    warmup: int = Field(3, ge=0, le=L.MAX_LATENCY_WARMUP)
    iters: int = Field(10, ge=1, le=L.MAX_LATENCY_ITERS)  # timed forwards; median and p90 reported
    # deploy-time runtime the U-Net is timed behind (nas/deploy/choices.py) and its precision;
    # with a runtime other than eager fp32, `dtype` stays fp32 (the precision says it)
    runtime: Runtime = "eager"
    precision: Precision = "fp32"
    # source: measure: `baseline` times every trial in alternation with the first of `baselines:`
    # and reports ratio x reference_ms (load hits both alike, nas/cost/relative.py); `none` times
    # the trial alone (before issue #32). Without baselines, or with a table, it has no effect.
    reference: Literal["baseline", "none"] = "baseline"
    # the baseline's latency in ms that ratios are scaled by, e.g. from a quiet `nas inspect
    # --latency`: the same in every study; default: the first baseline time the process measures
    reference_ms: float | None = Field(None, gt=0)
    # where reference_ms came from when `nas search` fixed it (the reference file shared by the
    # studies under one --results folder, nas/search/objective.py `shared_reference`); not set by hand
    reference_from: str | None = None

    @model_validator(mode="after")
    def _table_given(self) -> LatencySetup:
        if self.source == "table" and not self.table:
            raise ValueError("source: table needs table: PATH (a `nas latency-table` file)")
        if self.source == "measure" and (self.table or self.device_name):
            raise ValueError("table and device_name apply only to source: table")
        if self.source == "table" and self.reference_ms:
            raise ValueError("reference_ms applies only to source: measure (a table is immune to load)")
        if self.reference == "none" and self.reference_ms:
            raise ValueError("reference_ms scales ratios to the baseline: it needs reference: baseline")
        if (self.runtime, self.precision) != ("eager", "fp32"):
            problem = precision_error(self.runtime, self.precision)
            if problem:
                raise ValueError(problem)
            if self.source == "table" or self.dtype != "fp32":
                raise ValueError("runtime and precision apply to source: measure with dtype fp32")
        return self


class ZeroCost(Strict):
    """Cheap pre-filter before proxy training: score the untrained network on one batch and skip
    training for a point scoring below a quantile of the scores seen so far. Literature caveat
    (Abdelfattah et al. 2021; ZiCo 2023): #params / MACs is the baseline such a proxy must beat;
    `nas`'s proxy-fidelity experiment measures both on your space."""

    proxy: Literal["grad_norm", "snip", "synflow"] = "grad_norm"
    prune_below_quantile: float = Field(0.0, ge=0, lt=1)  # 0: record the score only, never prune
    warmup_trials: int = Field(5, ge=1, le=L.MAX_TRIALS)  # scores needed before pruning starts
    batch_size: int = Field(8, ge=1, le=L.MAX_BATCH)  # cache items scored


class ProxySetup(Strict):
    """Short training that scores a candidate (the search's fidelity knob: see proxy fidelity)."""

    steps: int = Field(200, ge=1, le=L.MAX_STEPS)  # optimizer steps per trial
    # steps between validation losses (pruning points)
    report_every: int = Field(50, ge=1, le=L.MAX_STEPS)
    recipe: str = "decidiffusion"  # training preset name or a train config YAML (nas train)
    overrides: dict[str, Any] = {}  # train config keys to change, e.g. {batch_size: 16, lr: 1.0e-3}
    seed: int = Field(0, ge=0, le=L.MAX_SEED)  # same for every trial: candidates differ only by arch
    pruner: Literal["hyperband", "successive_halving", "median", "none"] = (
        "hyperband"  # single objective only
    )
    zero_cost: ZeroCost | None = None  # null: no pre-filter
    # every trial starts from this teacher's weights (init: inherit) and distils from it for its
    # steps (nas/train/distill.py); teacher relative to the space file; null: plain proxy training
    distill: DistillConfig | None = None


class Space(Strict):
    """A search space file."""

    name: str
    description: str = ""
    settings: Settings = Settings()
    depth: IntRange  # number of resolution levels, 1..MAX_LEVELS
    # one entry per level up to depth.max, highest resolution first
    levels: list[LevelSpace] = Field(max_length=L.MAX_LEVELS)
    mid: MidSpace | None = MidSpace()  # null: no mid block in any point
    attention_layout: list[AttentionLayout] = ["stacked"]  # choices (see AttentionLayout)
    objectives: list[Objective] = [Objective(metric="proxy_loss"), Objective(metric="latency_ms")]
    budgets: Budgets = Budgets()
    latency: LatencySetup = LatencySetup()
    baselines: list[str] = []  # architecture files (relative to this file) enqueued first in a study
    proxy: ProxySetup = ProxySetup()

    def to_data(self) -> dict[str, Any]:
        """Plain data for YAML/JSON; `mid: null` kept (it means no mid block in any point)."""
        data = self.model_dump(mode="json", exclude_none=True)
        if self.mid is None:
            data["mid"] = None
        elif self.mid.resolution == ["same"]:
            del data["mid"]["resolution"]  # the default: files written stay as they were
        if self.attention_layout == ["stacked"]:
            del data["attention_layout"]
        return data

    @field_validator("attention_layout")
    @classmethod
    def _layouts(cls, v: list[str]) -> list[str]:
        return _unique_names(v, "attention_layout", ATTENTION_LAYOUTS)

    @field_validator("depth")
    @classmethod
    def _depth(cls, v: IntRange) -> IntRange:
        return _within(v, "depth", 1, L.MAX_LEVELS)

    @model_validator(mode="after")
    def _consistent(self) -> Space:
        if len(self.levels) != self.depth.max:
            raise ValueError(
                f"levels: give one entry per level up to depth.max={self.depth.max}, got {len(self.levels)}"
            )
        s = self.settings
        half = self.mid is not None and "half" in self.mid.resolution  # one resolution more
        note = " (mid.resolution half works one resolution below the last level)" if half else ""
        check_latent_size(s.latent_size, self.depth.max, half, "depth.max", note)
        for i, level in enumerate(self.levels):
            for c in level.channels:
                if c % s.norm_num_groups:
                    raise ValueError(
                        f"levels.{i}.channels: {c} is not divisible by settings.norm_num_groups={s.norm_num_groups}"
                    )
                for h in level.head_choices:
                    if c % h:
                        raise ValueError(
                            f"levels.{i}.{level.head_key}: {h} does not divide channels choice {c}"
                            " (every head choice must divide every channel choice of its level)"
                        )
        metrics = [o.metric for o in self.objectives]
        if not metrics or len(set(metrics)) != len(metrics):
            raise ValueError(
                f"objectives: give at least one metric, each once (allowed: {', '.join(METRICS)})"
            )
        return self


class ArchLevel(Strict):
    """One level of a concrete architecture."""

    # Upper bounds: nas/core/limits.py (each with the figures of real models it leaves room for).
    channels: int = Field(ge=1, le=L.MAX_CHANNELS)
    resnets: int = Field(ge=1, le=L.MAX_RESNETS)  # down path; the up path has resnets + 1
    attentions: int = Field(0, ge=0, le=L.MAX_ATTENTIONS)  # transformer layers on the down path
    up_attentions: int = Field(0, ge=0, le=L.MAX_ATTENTIONS)  # transformer layers on the up path
    heads: int | None = Field(None, ge=1, le=L.MAX_HEADS)  # attention head count ...
    # ... or head size; exactly one if the level has attention
    head_dim: int | None = Field(None, ge=1, le=L.MAX_CHANNELS)

    @model_validator(mode="after")
    def _heads(self) -> ArchLevel:
        if self.heads is not None and self.head_dim is not None:
            raise ValueError("give at most one of heads or head_dim")
        if (self.attentions or self.up_attentions) and self.heads is None and self.head_dim is None:
            raise ValueError("a level with attention needs heads or head_dim")
        return self

    def num_heads(self) -> int:
        """Head count (head_dim converted); 1 for a level without attention."""
        if self.heads is not None:
            return self.heads
        if self.head_dim is not None:
            return self.channels // self.head_dim
        return 1


class ArchMid(Strict):
    resnets: int = Field(2, ge=1, le=L.MAX_MID_RESNETS)  # every ResNet of the block
    attentions: int = Field(1, ge=0, le=L.MAX_ATTENTIONS)
    resolution: MidResolution = "same"  # half: one resolution below the last level (see MidResolution)


class Arch(Strict):
    """An architecture file: one U-Net."""

    name: str = "unnamed"
    settings: Settings = Settings()
    levels: list[ArchLevel] = Field(min_length=1, max_length=L.MAX_LEVELS)  # highest resolution first
    mid: ArchMid | None = ArchMid()  # null: no mid block (a missing key means the SD-style default)
    attention_layout: AttentionLayout = "stacked"  # see AttentionLayout

    def to_data(self) -> dict[str, Any]:
        """Plain data for YAML/JSON: unset head fields and the default layout keys dropped (files
        written stay as they were before those keys existed), `mid: null` kept (it means no mid)."""
        data = self.model_dump(mode="json")
        for level in data["levels"]:
            for key in ("heads", "head_dim"):
                if level[key] is None:
                    del level[key]
        if data["mid"] is not None and data["mid"]["resolution"] == "same":
            del data["mid"]["resolution"]
        if data["attention_layout"] == "stacked":
            del data["attention_layout"]
        if data["settings"]["time_cond_proj_dim"] is None:
            del data["settings"]["time_cond_proj_dim"]
        return data

    @model_validator(mode="after")
    def _buildable(self) -> Arch:
        s = self.settings
        half = self.mid is not None and self.mid.resolution == "half"  # one resolution more
        note = f" for {len(self.levels)} levels" + (" and mid.resolution half" if half else "")
        check_latent_size(s.latent_size, len(self.levels), half, "levels", note)
        for i, level in enumerate(self.levels):
            if level.channels % s.norm_num_groups:
                raise ValueError(
                    f"levels.{i}.channels={level.channels} must be divisible by"
                    f" settings.norm_num_groups={s.norm_num_groups}"
                )
            is_last = i == len(self.levels) - 1
            if (
                is_last
                and self.mid is not None
                and self.mid.attentions
                and level.num_heads() == 1
                and (level.heads is None and level.head_dim is None)
            ):
                raise ValueError(f"levels.{i} needs heads or head_dim: the mid block's attention uses them")
            for key in ("heads", "head_dim"):
                value = getattr(level, key)
                if value is not None and level.channels % value:
                    raise ValueError(f"levels.{i}.{key}={value} must divide channels={level.channels}")
        return self
