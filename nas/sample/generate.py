"""`nas sample`: images from a trained run, through diffusers' own StableDiffusionPipeline.

The run's components go into an in-memory `StableDiffusionPipeline`; prompts are encoded by the
run's text encoder (tokenized as the pipeline does) and the unconditional side of classifier-free
guidance is the cached empty caption. The denoising loop, CFG and VAE decode are therefore the
pipeline's, and an exported folder (nas/sample/export.py) called with the same prompt, seed, steps,
scheduler and guidance gives the same image (docs/sampling.md states the measured difference).

Seeds: image j of every prompt starts from `torch.Generator().manual_seed(seed + j)` (a CPU
generator, so the noise is the same on any device), one generator per image, so an image does not
depend on the batch it was generated in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.core import limits as L
from nas.core.errors import NasError
from nas.core.grid import GRID_PAD, MIN_CELL, labelled_grid
from nas.core.runfolder import portable, write_json
from nas.sample.components import LCM_MAX_STEPS, SCHEDULERS, SPACINGS, RunComponents, make_scheduler
from nas.sample.timing import StageClock


@dataclass(frozen=True)
class SampleSettings:
    """How images are drawn; every field goes into each image's JSON sidecar."""

    steps: int = 30  # denoising steps (the seed's claim: 30 steps match 50)
    guidance: float = 7.5  # classifier-free guidance scale (SD 1.5 default); 1 = no guidance
    scheduler: str = "ddim"  # key of nas.sample.components.SCHEDULERS
    spacing: str = "trailing"  # timestep grid; trailing never evaluates t = 0 (Lin et al. 2023)
    batch_size: int = 8  # images per pipeline call (CFG doubles the U-Net batch)
    runtime: str = "eager"  # key of nas.deploy.runtimes.RUNTIMES that runs the U-Net
    precision: str = "fp32"  # one of that runtime's precisions

    def check(self) -> SampleSettings:
        """One-line NasError for a setting out of its range (bounds: nas/core/limits.py)."""
        if not 1 <= self.steps <= L.MAX_SAMPLE_STEPS:
            raise NasError(f"--steps must be in 1..{L.MAX_SAMPLE_STEPS}, got {self.steps}")
        if not math.isfinite(self.guidance) or not 1 <= self.guidance <= L.MAX_GUIDANCE:
            raise NasError(
                f"--guidance must be in 1..{L.MAX_GUIDANCE:g} (1 = no classifier-free guidance),"
                f" got {self.guidance}"
            )
        if not 1 <= self.batch_size <= L.MAX_SAMPLE_BATCH:
            raise NasError(f"--batch-size must be in 1..{L.MAX_SAMPLE_BATCH}, got {self.batch_size}")
        if self.scheduler not in SCHEDULERS:
            raise NasError(
                f"--scheduler {self.scheduler!r}: unknown scheduler (allowed: {', '.join(SCHEDULERS)})"
            )
        if self.spacing not in SPACINGS:
            raise NasError(
                f"--spacing {self.spacing!r}: unknown timestep spacing (allowed: {', '.join(SPACINGS)})"
            )
        if self.scheduler == "lcm" and self.steps > LCM_MAX_STEPS:
            raise NasError(f"--steps {self.steps}: --scheduler lcm takes 1..{LCM_MAX_STEPS} steps "
                           "(the distillation grid; 1-8 is what it is for)")  # fmt: skip
        from nas.deploy.choices import precision_error
        from nas.deploy.runtimes import check_runtime

        # names only; whether it is installed and runs on the device: check_runtime with the device
        if precision_error(self.runtime, self.precision):
            check_runtime(self.runtime, self.precision)
        return self


def use_runtime(components: RunComponents, runtime: str = "eager", precision: str = "fp32") -> RunComponents:
    """Put the run's U-Net behind `runtime` (nas/deploy/runtimes.py); eager fp32 leaves it as loaded."""
    from nas.deploy.runtimes import RuntimeUNet, wrap_unet

    if isinstance(components.unet, RuntimeUNet):
        if (components.unet.name, components.unet.precision) != (runtime, precision):
            raise NasError(f"the U-Net already runs behind {components.unet.name} {components.unet.precision}; "
                           f"load the run again for {runtime} {precision}")  # fmt: skip
    elif (runtime, precision) != ("eager", "fp32"):
        device = str(components.empty_text.device)
        tokens = int(components.manifest["text_len"])
        components.unet = wrap_unet(components.unet, runtime, precision, device=device, tokens=tokens)
    return components


def pipeline_text_encoder(components: RunComponents):
    """The run's TextEncoder set up for a diffusers pipeline (StableDiffusionPipeline and its
    ControlNet sibling alike), so that the pipeline tokenizes and encodes as the cache did.

    StableDiffusionPipeline.encode_prompt passes the padding mask to the text encoder only when
    `text_encoder.config.use_attention_mask` is true (diffusers,
    pipelines/stable_diffusion/pipeline_stable_diffusion.py); CLIP was trained without it, BERT-like
    encoders need it. The tokenizer pads to `model_max_length`: the cache's text length."""
    te = components.text_encoder
    if te.model.config.model_type not in ("clip", "clip_text_model"):
        te.model.config.use_attention_mask = True
    te.tokenizer.model_max_length = te.max_length
    return te


def build_pipeline(
    components: RunComponents,
    scheduler: str = "ddim",
    spacing: str = "trailing",
    runtime: str = "eager",
    precision: str = "fp32",
):
    """A StableDiffusionPipeline of the run's U-Net (behind `runtime` at `precision`), VAE, text
    encoder and tokenizer (no safety checker); the scheduler and guidance code are the same for all."""
    from diffusers import StableDiffusionPipeline

    use_runtime(components, runtime, precision)
    pipe = StableDiffusionPipeline(**pipeline_parts(components, scheduler, spacing))
    # One bar across images instead (see generate). type: ignore: mypy reads diffusers' lazily imported
    # StableDiffusionPipeline as its dummy placeholder class, which lacks the method.
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe


def pipeline_parts(components: RunComponents, scheduler: str = "ddim", spacing: str = "trailing") -> dict:
    """The keyword arguments of a diffusers SD pipeline for the run (U-Net, VAE, text encoder and
    tokenizer, scheduler; no safety checker), shared by build_pipeline and the ControlNet pipeline."""
    te = pipeline_text_encoder(components)
    return {
        "vae": components.vae,
        "text_encoder": te.model,
        "tokenizer": te.tokenizer,
        "unet": components.unet,
        "scheduler": make_scheduler(scheduler, components.recipe, spacing),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def jobs_for(prompts: list[str], n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, seed) per image: `n` images of each prompt, seeds seed .. seed + n - 1."""
    if n < 1:
        raise NasError(f"--n must be >= 1, got {n}")
    if not prompts:
        raise NasError("no prompts to sample")
    return [(prompt, seed + j) for prompt in prompts for j in range(n)]


@torch.no_grad()
def generate(
    components: RunComponents,
    pipe,
    jobs: list[tuple[str, int]],
    settings: SampleSettings,
    progress: bool = True,
    desc: str = "sample",
    clock: StageClock | None = None,
    control: tuple[list, float] | None = None,
) -> np.ndarray:
    """Images of `jobs` ((prompt, seed) pairs) as float32 [N, H, W, 3] in [0, 1], in job order.
    `clock`: accumulate the text encoder / U-Net / VAE decode split of this call's time into it.
    `control`: (one control image per job, scale) for a ControlNet pipeline (nas/sample/controlnet.py)."""
    from contextlib import nullcontext

    from tqdm import tqdm

    settings.check()
    te = components.text_encoder
    size = components.resolution
    device = components.empty_text.device
    images = []
    timed = clock.attached(pipe, device) if clock is not None else nullcontext()
    with timed, tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start : start + settings.batch_size]
            with clock.part("text_encoder", device) if clock is not None else nullcontext():
                prompt_embeds, _ = te.encode([prompt for prompt, _ in batch])
            negative = components.empty_text[None].expand(len(batch), -1, -1).to(prompt_embeds)
            steer = {} if control is None else {"image": control[0][start : start + settings.batch_size],
                                                "controlnet_conditioning_scale": control[1]}  # fmt: skip
            out = pipe(
                **steer,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                generator=[torch.Generator().manual_seed(s) for _, s in batch],
                height=size,
                width=size,
                output_type="np",
            )
            images.append(out.images.astype(np.float32))
            bar.update(len(batch))
            if clock is not None:
                clock.images += len(batch)
    return np.concatenate(images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats to bytes exactly as the pipeline's PIL output does (round half to even)."""
    return (images * 255).round().astype(np.uint8)


def image_grid(images: np.ndarray, columns: int, pad: int = GRID_PAD, min_cell: int = MIN_CELL) -> np.ndarray:
    """uint8 [N, H, W, 3] tiled row by row, `columns` wide, with a white border; images smaller than
    `min_cell` pixels are enlarged by a whole factor (nearest neighbour: no invented detail), so a
    grid of 32 px samples is readable. The single PNGs keep the model's resolution. No labels: see
    `sample_grid` (nas/core/grid.py draws both)."""
    return labelled_grid(images, columns, pad=pad, min_cell=min_cell)[0]


def _shared(values: list) -> object | None:
    """The one value all entries share, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


def sample_grid(
    pixels: np.ndarray, jobs: list[tuple[str, int]], settings: SampleSettings, columns: int, weights: str = ""
) -> np.ndarray:
    """The grid of `nas sample` with its labels in added margins: each row's prompt on the left
    (wrapped, cut with "..." to the row height), each column's seed on top, and a title with the
    steps, guidance, scheduler, spacing and weights. The cells are the single PNGs, enlarged by a
    whole factor (nearest neighbour) as in `image_grid`."""
    rows = [jobs[r : r + columns] for r in range(0, len(jobs), columns)]
    row_labels = [" / ".join(dict.fromkeys(prompt for prompt, _ in row)) for row in rows]
    seeds = [_shared([row[c][1] for row in rows if c < len(row)]) for c in range(columns)]
    column_labels = [f"seed {seed}" if seed is not None else "" for seed in seeds]
    title = (
        f"{settings.steps} steps, guidance {settings.guidance:g}, {settings.scheduler} ({settings.spacing})"
    )
    title += f", {weights} weights" if weights else ""
    if (settings.runtime, settings.precision) != ("eager", "fp32"):
        title += f", {settings.runtime} {settings.precision}"
    return labelled_grid(pixels, columns, row_labels=row_labels, column_labels=column_labels, title=title)[0]


def sidecar(components: RunComponents, prompt: str, seed: int, settings: SampleSettings, file: str) -> dict:
    """The JSON written beside each image: enough to regenerate it with nas or with the pipeline."""
    return {
        "file": file,
        "prompt": prompt,
        "seed": seed,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "scheduler_class": SCHEDULERS[settings.scheduler][0],
        "timestep_spacing": settings.spacing,
        "guidance": settings.guidance,
        "runtime": settings.runtime,
        "precision": settings.precision,
        "width": components.resolution,
        "height": components.resolution,
        "weights": components.weights,
        "model_sha256": components.model_sha256,
        "run": portable(components.run),
        "lora": components.lora,  # file, sha256 and scale of a LoRA in the U-Net (None: none)
        "controlnet": getattr(components, "controlnet", None),  # folder, sha256, scale (None: none)
    }


def check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise NasError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise NasError(f"{out}: folder is not empty; choose a new --out (nothing was written)")


def write_samples(
    components: RunComponents,
    jobs: list[tuple[str, int]],
    images: np.ndarray,
    settings: SampleSettings,
    out: str | Path,
    columns: int,
) -> list[Path]:
    """OUT/NNNN.png + OUT/NNNN.json per image and OUT/grid.png (one row per prompt, labelled with
    its prompt, each column with its seed, the title with the settings); the PNG paths."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    paths = []
    for i, ((prompt, seed), image) in enumerate(zip(jobs, pixels)):
        path = out / f"{i:04d}.png"
        Image.fromarray(image).save(path)
        meta = sidecar(components, prompt, seed, settings, path.name)
        write_json(path.with_suffix(".json"), meta)
        paths.append(path)
    grid = sample_grid(pixels, jobs, settings, columns, weights=components.weights)
    Image.fromarray(grid).save(out / "grid.png")
    return paths


def sample_run(
    run: str | Path,
    prompts: list[str] | None,
    out: str | Path,
    settings: SampleSettings,
    n: int = 1,
    seed: int = 0,
    weights: str = "auto",
    device: str = "cpu",
    progress: bool = True,
    lora=None,
    controlnet=None,
) -> list[Path]:
    """`nas sample`: load the run, draw `n` images per prompt, write PNGs, sidecars and a grid.

    Without prompts, the first 4 captions the trainer held out of the cache are used. `lora`: a
    `nas.sample.components.LoraChoice` put into the U-Net (named in every sidecar). `controlnet`: a
    `nas.sample.controlnet.ControlChoice` with its control image, steering every image (named too).
    """
    from nas.sample.components import held_out_captions, load_run

    settings.check()
    out = Path(out)
    check_out_folder(out)
    prompts = prompts or held_out_captions(run, 4)
    components = load_run(run, weights=weights, device=device, lora=lora)
    jobs = jobs_for(prompts, n, seed)
    pipe = build_pipeline(
        components, settings.scheduler, settings.spacing, settings.runtime, settings.precision
    )
    control = None
    if controlnet is not None:  # the same U-Net, steered (checked: fits the U-Net, image of the output size)
        pipe, control = controlnet.pipeline(components, settings, len(jobs))
    images = generate(components, pipe, jobs, settings, progress=progress, control=control)
    return write_samples(components, jobs, images, settings, out, columns=n)
