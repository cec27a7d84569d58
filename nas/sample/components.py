"""What sampling needs from a training run: weights, frozen encoders, empty caption, noise schedule.

A run folder (`nas train`, see nas/core/runfolder.py) holds the resolved config (recipe and cache path)
and `final/unet` / `final/unet_ema` (save_pretrained folders). The VAE and text encoder are the ones
the latent cache was made with; its manifest names them and their sha256, which are checked here,
so a sampler never pairs a U-Net with encoders it was not trained on.

A LoRA (`--lora DIR`: a `lora:` run of `nas train` or any diffusers LoRA folder/file) goes into the
U-Net the way `pipe.load_lora_weights(DIR)` puts it there (diffusers' `lora_state_dict` and
`load_lora_into_unet`), after a shape check that names the first module it does not fit.

Inference schedulers are diffusers' own, configured from the run's recipe by the same
`nas.diffusion.scheduler_config` the trainer uses (betas, zero terminal SNR, prediction type).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nas.core.errors import NasError
from nas.core.runfolder import CONFIG
from nas.models.load import load_unet, weights_folder

# name -> (diffusers class, extra config). One explicit table; unknown names are errors.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),  # Song et al. 2021, deterministic (eta = 0)
    # DPM-Solver++ 2M (Lu et al. 2022): diffusers' default multistep solver for text-to-image
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022, Algorithm 2 without churn
    # Latent consistency models (Luo et al. 2023), for students of `distill: {kind: consistency}`:
    # 1-8 steps on the skipping-step grid the student was distilled on (original_inference_steps =
    # its num_ddim_timesteps, 50 by default; boundary scalings with timestep_scaling 10, as
    # nas/train/consistency.py). With a guidance embedding the pipeline feeds --guidance to it and
    # makes one U-Net call per step; without one, use --guidance 1 (guidance was distilled in).
    "lcm": ("LCMScheduler", {"original_inference_steps": 50, "timestep_scaling": 10.0}),
}
LCM_MAX_STEPS = 50  # LCMScheduler refuses more steps than original_inference_steps
# Timestep grids. "trailing" starts at t = T-1 and never evaluates t = 0 (Lin et al. 2023, the seed's
# "omit step 0"); "leading" (SD 1.5, with steps_offset 1) and "linspace" (includes t = 0) for comparison.
SPACINGS = ("trailing", "leading", "linspace")


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise NasError(f"--scheduler {name!r}: unknown scheduler (allowed: {', '.join(SCHEDULERS)})")
    return name


def make_scheduler(name: str, recipe, spacing: str = "trailing"):
    """A diffusers inference scheduler configured as the run was trained (`recipe`: diffusion.Recipe)."""
    import diffusers

    from nas.diffusion import scheduler_config

    check_scheduler(name)
    if spacing not in SPACINGS:
        raise NasError(f"--spacing {spacing!r}: unknown timestep spacing (allowed: {', '.join(SPACINGS)})")
    class_name, extra = SCHEDULERS[name]
    config = {**scheduler_config(recipe), **extra, "timestep_spacing": spacing}
    # StableDiffusionPipeline rewrites steps_offset to 1 (with a deprecation warning); it moves only the
    # "leading" grid, where the recipe already says 1, so setting it here changes no timestep.
    config["steps_offset"] = 1
    return getattr(diffusers, class_name).from_config(config)


@dataclass
class RunComponents:
    """Everything a sampler or an exported pipeline is made of, loaded from one run folder."""

    run: Path
    unet: Any  # UNet2DConditionModel or nas.models.FlexUNet2DConditionModel, eval mode
    vae: Any  # AutoencoderKL; config.scaling_factor set to the cache's
    text_encoder: Any  # nas.data.encoders.TextEncoder (model, tokenizer capped to the cache's text_len)
    empty_text: torch.Tensor  # [T, D]: the cached empty caption, the unconditional side of CFG
    recipe: Any  # nas.diffusion.Recipe the run was trained with
    manifest: dict  # the latent cache's manifest
    cache: Any  # nas.data.cache.LatentCache
    weights: str  # "ema" or "raw"
    model_sha256: str  # sha256 of the U-Net weight files used
    lora: dict | None = None  # the LoRA in the U-Net (file, sha256, scale), if any

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    def to(self, device: str | torch.device) -> RunComponents:
        self.unet.to(device)
        self.vae.to(device)
        self.text_encoder.to(device)
        self.empty_text = self.empty_text.to(device)
        return self


def read_run_config(run: Path):
    """The run's resolved TrainConfig (RUN/config.yaml), validated strictly."""
    from nas.core.config import load
    from nas.train.config import TrainConfig

    if not run.is_dir():
        raise NasError(f"{run}: run folder not found (expected the --out folder of `nas train`)")
    return load(TrainConfig, run / CONFIG)


def _check_identity(kind: str, expected: dict, actual_sha: str, cache_path: Path) -> None:
    if expected.get("sha256") and expected["sha256"] != actual_sha:
        raise NasError(f"{cache_path}: the {kind} at {expected.get('path')} has changed since the cache was "
                       f"made (sha256 {actual_sha[:12]}, cache says {expected['sha256'][:12]})")  # fmt: skip


def load_encoders(manifest: dict, cache_path: str | Path):
    """(VAE, TextEncoder) the cache was made with, their sha256 checked against its manifest; the
    VAE's scaling_factor set to the cache's (the pipeline divides the latents by it)."""
    from nas.data.encoders import load_text_encoder, load_vae, vae_folder, weights_sha256

    cache_path = Path(cache_path)
    vae = load_vae(manifest["vae"]["path"])
    _check_identity("VAE", manifest["vae"], weights_sha256(vae_folder(manifest["vae"]["path"])), cache_path)
    vae.register_to_config(scaling_factor=float(manifest["scaling_factor"]))
    text_encoder = load_text_encoder(manifest["text_encoder"]["path"], max_length=int(manifest["text_len"]))
    _check_identity("text encoder", manifest["text_encoder"], text_encoder.identity["sha256"], cache_path)
    return vae, text_encoder


def load_run(
    run: str | Path,
    weights: str = "auto",
    device: str | torch.device = "cpu",
    lora: LoraChoice | None = None,
) -> RunComponents:
    """Load a trained run's U-Net (EMA by default), the cache's VAE and text encoder, and its recipe;
    with `lora` (`lora_choice`), that LoRA in the U-Net at its scale."""
    from nas.data.cache import open_cache
    from nas.data.encoders import weights_sha256
    from nas.train.data import check_compatible

    run = Path(run)
    config = read_run_config(run)
    kind, folder = weights_folder(run, weights)
    if config.cache is None:
        raise NasError(f"{run / 'config.yaml'}: cache: not set; the sampler needs the run's latent cache")
    cache_path = Path(config.cache)
    cache = open_cache(cache_path)
    manifest = cache.manifest
    if float(manifest.get("shift_factor", 0.0) or 0.0) != 0.0:
        raise NasError(f"{cache_path}: VAE shift_factor {manifest['shift_factor']} is not supported by "
                       "StableDiffusionPipeline; sample from a cache made with a shift-free VAE")  # fmt: skip

    unet = load_unet(folder)
    check_compatible(dict(unet.config), manifest, str(folder), str(cache_path))
    vae, text_encoder = load_encoders(manifest, cache_path)
    empty, _ = cache.empty_text()
    components = RunComponents(
        run=run,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        empty_text=empty.float(),
        recipe=config.diffusion,
        manifest=manifest,
        cache=cache,
        weights=kind,
        model_sha256=weights_sha256(folder),
    )
    if lora is not None:
        components.lora = load_lora(unet, lora.path, lora.scale)
    return components.to(device)


# --- LoRA -------------------------------------------------------------------------------------------

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_ADAPTER = "lora"  # adapter name in the U-Net
MAX_LORA_SCALE = 10.0  # |scale| bound of --lora-scale: 1 is the trained strength, > 2 rarely useful


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA to sample with: a folder holding pytorch_lora_weights.safetensors, or the file."""

    path: Path
    scale: float = 1.0  # multiplies the adapter's update (diffusers' set_adapters weight)


def lora_file(path: str | Path) -> Path:
    """The LoRA weights file of `--lora PATH` (a folder with pytorch_lora_weights.safetensors, or a
    .safetensors file); one-line NasError otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHTS
        if not path.is_file():
            raise NasError(f"--lora {path.parent}: no {LORA_WEIGHTS} (a `lora:` run of `nas train`, or a folder "
                           "written by save_lora_weights)")  # fmt: skip
        return path
    if not path.is_file():
        raise NasError(f"--lora {path}: not found (a LoRA folder or .safetensors file)")
    if path.suffix != ".safetensors":
        raise NasError(f"--lora {path}: only .safetensors LoRA files are read (no pickles)")
    return path


def lora_choice(path: str | Path | None, scale: float = 1.0) -> LoraChoice | None:
    """`--lora PATH --lora-scale S` checked: the LoRA file and its scale (None without --lora)."""
    if path is None:
        return None
    if not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
        raise NasError(
            f"--lora-scale {scale}: allowed -{MAX_LORA_SCALE:g}..{MAX_LORA_SCALE:g} (1 = as trained)"
        )
    return LoraChoice(lora_file(path), scale)


def check_lora_fits(state_dict: dict[str, torch.Tensor], unet, file: Path) -> None:
    """Every LoRA pair fits a layer of `unet` (names and shapes); NasError naming the first that does not."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith("unet."):
            raise NasError(
                f"{file}: {key}: only U-Net LoRAs are applied (keys unet.*), not text encoder ones"
            )
        for part, side in ((".lora_A.", "A"), (".lora_B.", "B"), (".lora.down.", "A"), (".lora.up.", "B")):
            if part in key and key.endswith(".weight"):
                pairs.setdefault(key[len("unet.") : key.index(part)], {})[side] = value
    if not pairs:
        raise NasError(f"{file}: no U-Net LoRA weights (expected keys unet.<module>.lora_A/lora_B.weight)")
    modules = dict(unet.named_modules())
    for name, pair in pairs.items():
        weight = getattr(modules.get(name), "weight", None)
        if weight is None:
            raise NasError(f"{file}: a LoRA for another architecture: module {name} is not in this U-Net "
                           f"({type(unet).__name__})")  # fmt: skip
        a, b = pair.get("A"), pair.get("B")
        if (a is not None and a.shape[1] != weight.shape[1]) or (
            b is not None and b.shape[0] != weight.shape[0]
        ):
            got = f"{a.shape[1] if a is not None else '?'} in, {b.shape[0] if b is not None else '?'} out"
            raise NasError(f"{file}: a LoRA for another architecture: module {name} has {weight.shape[1]} in, "
                           f"{weight.shape[0]} out features here, the LoRA {got}")  # fmt: skip


def load_lora(unet, path: str | Path, scale: float = 1.0) -> dict:
    """Put a LoRA into `unet` as `pipe.load_lora_weights(path)` + `set_adapters(..., scale)` would;
    return what was loaded (file, sha256, scale)."""
    from diffusers import StableDiffusionPipeline

    file = lora_file(path)
    try:
        state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, return_lora_metadata=True, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise NasError(f"{file}: not a LoRA file ({str(exc).strip().splitlines()[0]})") from None
    check_lora_fits(state_dict, unet, file)
    StableDiffusionPipeline.load_lora_into_unet(
        state_dict, network_alphas=alphas, unet=unet, adapter_name=LORA_ADAPTER, metadata=metadata
    )
    unet.set_adapters([LORA_ADAPTER], [scale])
    return {"file": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "scale": scale}


def read_prompts(prompts: list[str] | None, prompts_file: str | Path | None) -> list[str] | None:
    """Prompts from --prompt or --prompts-file (one a line; blank lines and '#' lines skipped)."""
    if prompts and prompts_file:
        raise NasError("--prompt and --prompts-file: give one or the other")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise NasError(f"{path}: prompts file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise NasError(f"{path}: not a UTF-8 text file (expected one prompt a line)") from None
        found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not found:
            raise NasError(f"{path}: no prompts (expected one prompt a line)")
        return found
    if prompts is not None:
        if not prompts or any(not p.strip() for p in prompts):
            raise NasError("--prompt: empty prompt (give the text to draw)")
        return [p.strip() for p in prompts]
    return None


def held_out_captions(run: str | Path, count: int) -> list[str]:
    """The first `count` captions the trainer held out (the last `val_items` items of the run's cache)."""
    from nas.data.cache import open_cache

    config = read_run_config(Path(run))
    if config.cache is None:
        raise NasError(f"{Path(run) / 'config.yaml'}: cache: not set; pass prompts")
    captions = open_cache(config.cache).captions()
    held_out = captions[len(captions) - min(config.val_items, len(captions)) :]
    return held_out[:count]
