"""`TrainConfig`: the training recipe as a strict schema, named presets and `--set key=value`.

The defaults are the DeciDiffusion recipe (cosine betas, zero terminal SNR, v-prediction, Min-SNR
gamma=5, EMA for the last 5%). Presets in nas/train/presets/<name>.yaml (package data) are short overrides of these
defaults; a config file may start from one with `preset: NAME` and override any key. Command-line
overrides (`--set lr=2e-4 ema.start=0.9 ema=null`) are parsed as YAML values and checked against the
schema like the file itself, so a typo or a wrong type is a one-line error naming the key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from nas.core import limits as L
from nas.core.config import Strict, read_yaml, validate
from nas.core.errors import NasError
from nas.diffusion import Recipe
from nas.space.distill import DistillConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: installed with the wheel
# name -> file in nas/train/presets/. One explicit table; an unknown name is an error listing these.
PRESETS: dict[str, str] = {
    "decidiffusion": "decidiffusion.yaml",  # the default recipe (DeciDiffusion 1.0)
    "sd15": "sd15.yaml",  # Stable Diffusion 1.5's recipe, for comparisons
    "tiny": "tiny.yaml",  # minutes on a CPU: smoke tests and the shapes demo
}
# Where the presets lived before they became package data: experiments/train_<name>.yaml.
MOVED_PRESET = re.compile(r"train_(" + "|".join(PRESETS) + r")\.yaml")
# Keys a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_KEYS = (
    "name",
    "arch",
    "cache",
    "max_steps",
    "num_workers",
    "log_every",
    "val_every",
    "checkpoint_every",
    "keep_checkpoints",
    "gradient_checkpointing",
    "report_to",
    "sample_every",
)


class EMAConfig(Strict):
    """Exponential moving average of the weights (diffusers' `EMAModel`), kept from `start` onward."""

    # fraction of max_steps after which the EMA starts from the current weights;
    # DeciDiffusion: last ~5% of training (~15% faster, ~10% larger batch); 0 = throughout (SD 1.5)
    start: float = Field(0.95, ge=0, lt=1)
    # upper bound of the decay; EMAModel ramps up to it as (1 + n) / (10 + n) over n EMA steps
    decay: float = Field(0.9999, gt=0, lt=1)


class LoraTrainConfig(Strict):
    """`lora:` LoRA fine-tuning of a trained run (nas/train/lora.py): the base frozen, only the adapter
    trained; saved as diffusers' RUN/pytorch_lora_weights.safetensors. Defaults: diffusers'
    examples/text_to_image/train_text_to_image_lora.py (`--rank 4`, lora_alpha = rank, attention
    projections)."""

    init_from: str  # the `nas train` run folder whose U-Net is fine-tuned; relative to this file
    # LoRA rank r; at most 1280, SD 1.5's widest layer (a rank above a layer's width adds nothing)
    rank: int = Field(4, ge=1, le=1280)
    # lora_alpha: the update is scaled by alpha / rank; left out or null: = rank
    alpha: float = Field(4.0, gt=0, le=1e4)
    # module name suffixes the adapter wraps (peft's target_modules): the attention projections
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _alpha_is_rank(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alpha") is None:
            data = {**data, "alpha": data.get("rank", 4)}
        return data


class ControlNetTrainConfig(Strict):
    """`controlnet:` a ControlNet (Zhang et al. 2023) for a trained run (nas/train/controlnet.py): the
    run's U-Net frozen, a ControlNet made from it (copied encoder, zero output convolutions) trained on
    (condition image, caption, latent) with the U-Net's diffusion loss, as diffusers'
    examples/controlnet/train_controlnet.py; saved as a diffusers ControlNet folder RUN/controlnet."""

    init_from: str  # the `nas train` run folder whose U-Net is steered; relative to this file
    # the condition image, re-drawn for each cached shapes item (nas/data/shapes.py CONDITIONS): mask
    # (the objects' silhouettes: position and size at a glance, even at 32 px) or edges (outlines, 1 px)
    condition: Literal["mask", "edges"] = "mask"

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: Any) -> Any:  # a --set path is relative to the working directory
        if isinstance(data, dict) and isinstance(data.get("init_from"), str):
            data = {**data, "init_from": str(Path(data["init_from"]).resolve())}
        return data


class TrainConfig(Strict):
    """One training run (or, with `proxy_train`, one short proxy run of the search)."""

    name: str = "train"  # run name: default output folder results/train/<arch name>-<name>
    arch: str | None = None  # architecture YAML; `--arch` overrides; relative to this file
    cache: str | None = (
        None  # latent cache folder (`nas precompute`); `--cache` overrides; relative to this file
    )
    diffusion: Recipe = Recipe()  # noise schedule, prediction type, Min-SNR (nas/diffusion.py)
    ema: EMAConfig | None = EMAConfig()  # null: no EMA
    # distillation from a teacher U-Net: kind bk_sdm (nas/train/distill.py, BK-SDM) or consistency
    # (nas/train/consistency.py, LCM); null: none
    distill: DistillConfig | None = None
    lora: LoraTrainConfig | None = None  # LoRA fine-tuning of a trained run; null: train the whole U-Net
    controlnet: ControlNetTrainConfig | None = None  # a ControlNet for a trained run; null: none

    # Upper bounds: nas/core/limits.py (each with the figures of real runs it leaves room for); NaN and
    # infinity are refused in every float field (nas.core.config.Strict).
    # seeds model init, data order, latent draws, noise, timesteps, caption drop
    seed: int = Field(0, ge=0, le=L.MAX_SEED)
    max_steps: int = Field(10_000, ge=1, le=L.MAX_STEPS)  # optimizer steps
    batch_size: int = Field(32, ge=1, le=L.MAX_BATCH)  # samples per process per micro-step
    # micro-steps per optimizer step (global batch = batch * accum * GPUs)
    grad_accum: int = Field(1, ge=1, le=L.MAX_GRAD_ACCUM)

    # AdamW peak learning rate (SD 1.5 / diffusers text-to-image: 1e-4)
    lr: float = Field(1e-4, gt=0, le=L.MAX_LR)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"  # after warm-up
    # linear LR warm-up, optimizer steps (SD: 10k at batch 2048)
    warmup_steps: int = Field(500, ge=0, le=L.MAX_STEPS)
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # AdamW defaults (Loshchilov & Hutter 2019)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0, le=1)  # added to sqrt(v); PyTorch default 1e-8
    # decoupled weight decay (diffusers text-to-image: 1e-2)
    weight_decay: float = Field(1e-2, ge=0, le=L.MAX_WEIGHT_DECAY)
    # max global gradient norm; null = no clipping
    grad_clip: float | None = Field(1.0, gt=0, le=L.MAX_GRAD_CLIP)

    # probability that a caption is replaced by the empty caption: classifier-free guidance
    # training (Ho & Salimans 2022; SD 1.5 fine-tuning: 0.1)
    cfg_drop: float = Field(0.1, ge=0, le=1)
    # background processes preparing batches (latent draws, noise) ahead of the GPU; 0 = in the
    # training process, enough on CPU and for small latents; e.g. 4 for SD-size latents on a GPU
    num_workers: int = Field(0, ge=0, le=L.MAX_WORKERS)
    # autocast: auto = bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU (weights stay fp32)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    # recompute each block's activations in the backward pass instead of storing them: the same
    # gradients for ~30% more time and a fraction of the activation memory (diffusers'
    # enable_gradient_checkpointing; SD-size students at 64x64 latents on a 24 GB machine)
    gradient_checkpointing: bool = False
    # experiment tracking through accelerate's trackers (nas/train/tracking.py): metrics.csv's columns
    # go to TensorBoard (RUN/tracking/) or Weights & Biases (offline without an account) as well
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    # optimizer steps between sample grids sent to that tracker (4 held-out captions, seed 0, 8 DDIM
    # steps: nas/sample/training_grid.py), and one at the end; 0 = never. Off by default: a grid loads
    # the cache's VAE and text encoder and costs 8 x 4 U-Net calls with guidance, which on SD-size
    # U-Nets is more than a validation; search proxy runs never sample (proxy_train sets 0)
    sample_every: int = Field(0, ge=0, le=L.MAX_STEPS)
    # keep only the cache items whose record has these values (nas/train/data.py `select_items`): a
    # dotted key reaches into lists of mappings, e.g. {"objects.shape": "triangle"} keeps the shapes
    # images with a triangle; held-out items are then the last val_items of the kept ones. null: all
    cache_filter: dict[str, str] | None = Field(None, max_length=16)

    # last N cache items, held out: never trained on
    val_items: int = Field(64, ge=1, le=L.MAX_VAL_ITEMS)
    # (item, timestep, noise) triples per held-out item
    val_timesteps: int = Field(4, ge=1, le=L.MAX_VAL_TIMESTEPS)
    # fixed, so validation triples match across runs and architectures
    val_seed: int = Field(1234, ge=0, le=L.MAX_SEED)
    val_every: int = Field(500, ge=1, le=L.MAX_STEPS)  # optimizer steps between validation losses
    log_every: int = Field(10, ge=1, le=L.MAX_STEPS)  # optimizer steps between metrics.csv rows
    # optimizer steps between checkpoints (and one at the end)
    checkpoint_every: int = Field(1000, ge=1, le=L.MAX_STEPS)
    # newest checkpoints kept on disk
    keep_checkpoints: int = Field(2, ge=1, le=L.MAX_KEEP_CHECKPOINTS)

    @model_validator(mode="after")
    def _lora_alone(self) -> TrainConfig:
        if self.lora is not None and self.distill is not None:
            raise ValueError(
                "lora: and distill: together: a LoRA run fine-tunes one trained U-Net; set distill: null"
            )
        if self.lora is not None and self.ema is not None:
            raise ValueError("lora: needs ema: null (the adapter is trained without an EMA, as diffusers' "
                             "train_text_to_image_lora.py); add ema: null or --set ema=null")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _samples_need_a_tracker(self) -> TrainConfig:
        if self.sample_every and self.report_to == "none":
            raise ValueError(f"sample_every {self.sample_every}: sample grids go to the tracker; set report_to "
                             "to tensorboard or wandb, or sample_every to 0")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _controlnet_alone(self) -> TrainConfig:
        if self.controlnet is not None and (self.lora is not None or self.distill is not None):
            raise ValueError("controlnet: with lora: or distill:: a ControlNet run trains a ControlNet beside one "
                             "frozen trained U-Net; set lora: null and distill: null")  # fmt: skip
        if self.controlnet is not None and self.ema is not None:
            raise ValueError("controlnet: needs ema: null (trained without an EMA, as diffusers' "
                             "train_controlnet.py); add ema: null or --set ema=null")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _consistency_recipe(self) -> TrainConfig:
        d, recipe = self.distill, self.diffusion
        if d is None or d.kind != "consistency":
            return self
        if recipe.prediction == "epsilon" and recipe.zero_terminal_snr:
            raise ValueError(
                "distill.kind consistency with diffusion.prediction epsilon and zero_terminal_snr true: at"
                " t = T-1 alpha_bar = 0 and x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) is"
                " undefined; use prediction v_prediction (x0 = -v there) or zero_terminal_snr false"
            )
        if recipe.num_train_timesteps % d.num_ddim_timesteps:
            raise ValueError(
                f"distill.num_ddim_timesteps {d.num_ddim_timesteps} must divide diffusion.num_train_timesteps"
                f" {recipe.num_train_timesteps} (the solver grid k*i - 1 then ends at T-1; LCM: 50 of 1000)"
            )
        return self

    def global_batch(self, processes: int = 1) -> int:
        return self.batch_size * self.grad_accum * processes

    def ema_start_step(self) -> int | None:
        """First optimizer step (0-based) at which the EMA exists, or None without EMA."""
        if self.ema is None:
            return None
        return min(int(self.ema.start * self.max_steps), self.max_steps - 1)


def preset_path(name: str) -> Path:
    """nas/train/presets/<name>.yaml for a preset name (NasError listing the names otherwise)."""
    if name not in PRESETS:
        raise NasError(f"unknown preset {name!r} (allowed: {', '.join(PRESETS)}, or a path to a .yaml file)")
    return PRESET_DIR / PRESETS[name]


def _read_mapping(path: Path) -> dict:
    moved = MOVED_PRESET.fullmatch(path.name)
    if moved and path.parent.name == "experiments" and not path.exists():
        name = moved.group(1)
        raise NasError(f"{path}: presets moved into the package: use the preset name {name!r} "
                       f"(nas/train/presets/{PRESETS[name]})")  # fmt: skip
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NasError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _absolute_paths(data: dict, folder: Path) -> dict:
    """Paths written in a config file are relative to that file."""
    for key in ("arch", "cache"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((folder / data[key]).resolve())
    distill = data.get("distill")
    teacher = distill.get("teacher") if isinstance(distill, dict) else None
    if isinstance(distill, dict) and isinstance(teacher, str) and not Path(teacher).is_absolute():
        distill["teacher"] = str((folder / teacher).resolve())
    lora = data.get("lora")
    init_from = lora.get("init_from") if isinstance(lora, dict) else None
    if isinstance(lora, dict) and isinstance(init_from, str) and not Path(init_from).is_absolute():
        lora["init_from"] = str((folder / init_from).resolve())
    control = data.get("controlnet")
    base = control.get("init_from") if isinstance(control, dict) else None
    if isinstance(control, dict) and isinstance(base, str) and not Path(base).is_absolute():
        control["init_from"] = str((folder / base).resolve())
    return data


def read_config_data(spec: str) -> tuple[dict, str]:
    """Raw config dict and its source name, from a preset name or a YAML path (`preset:` merged)."""
    path = Path(spec)
    if spec in PRESETS or (not path.suffix and not path.exists()):
        path = preset_path(spec)
    return _read_with_presets(path, seen=()), str(path)


def _read_with_presets(path: Path, seen: tuple[str, ...]) -> dict:
    data = _absolute_paths(_read_mapping(path), path.parent)
    base_name = data.pop("preset", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str) or base_name not in PRESETS:
        raise NasError(f"{path}: preset: unknown preset {base_name!r} (allowed: {', '.join(PRESETS)})")
    if base_name in seen:
        raise NasError(f"{path}: preset: {base_name!r} names itself through {' -> '.join(seen)}")
    return _merge(_read_with_presets(preset_path(base_name), (*seen, base_name)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML: 2e-4 -> float, null -> None, true -> bool)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise NasError(f"--set {text}: expected KEY=VALUE (e.g. lr=2e-4, ema.start=0.9, ema=null)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text, the schema decides whether a string is allowed
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each dotted key in a copy of `data` (sections absent or null become mappings)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = (), **values: Any) -> TrainConfig:
    """Resolve a preset name or YAML file, then `--set` overrides, then keyword values (flags).

    Errors name the file for what the file got wrong and `--set` for what an override got wrong.
    """
    data, source = read_config_data(spec)
    config = validate(TrainConfig, data, source)
    if overrides:
        data = apply_overrides(data, list(overrides))
        config = validate(TrainConfig, data, "--set")
    flags = {k: v for k, v in values.items() if v is not None}
    if flags:
        config = validate(TrainConfig, {**data, **flags}, "flags")
    return config


def check_resumable(saved: dict, current: TrainConfig, source: str | Path) -> None:
    """A resumed run must train the same recipe; only RESUMABLE_KEYS may change."""
    now = current.model_dump(mode="json")
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_KEYS or saved.get(key) == now.get(key):
            continue
        raise NasError(
            f"{source}: {key}: the checkpoint was trained with {saved.get(key)!r}, this run asks for"
            f" {now.get(key)!r}; resume with the same config (only {', '.join(RESUMABLE_KEYS)} may change)"
        )
