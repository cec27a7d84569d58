"""Draw images from a trained run: diffusers schedulers configured as the run was trained, trailing
timesteps (t = 0 is never evaluated), classifier-free guidance against the cached empty caption, EMA
weights by default. Writes one PNG and one JSON sidecar per image and a grid (one row per prompt)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from nas.core import limits as L
from nas.core.settings import CommandSettings, arg
from nas.deploy.choices import Precision, Runtime

Scheduler = Literal["ddim", "dpmpp", "euler", "lcm"]  # keys of nas.sample.components.SCHEDULERS
Spacing = Literal["trailing", "leading", "linspace"]  # nas.sample.components.SPACINGS
Weights = Literal["auto", "ema", "raw"]  # nas.sample.components.WEIGHTS
MAX_STEPS = L.MAX_SAMPLE_STEPS  # denoising steps: at most one per training timestep
MAX_IMAGES = L.MAX_IMAGES  # images per prompt or per step count; more would run for days


class Sampling(CommandSettings):
    """Settings shared by `nas sample`, `nas eval` and `nas compare`."""

    guidance: float = arg(7.5, "classifier-free guidance scale; 1 = none", ge=1, le=L.MAX_GUIDANCE)
    scheduler: Scheduler = arg(
        "ddim", "ddim, dpmpp (DPM-Solver++ 2M), euler, or lcm (consistency students, 1-8 steps)"
    )
    spacing: Spacing = arg("trailing", "timestep grid; trailing never evaluates t=0 (Lin et al. 2023)")
    seed: int = arg(0, "image j of each prompt uses seed + j", ge=0, le=L.MAX_SEED)
    weights: Weights = arg("auto", "auto (EMA if the run has it), ema or raw")
    batch_size: int = arg(8, "images per pipeline call", ge=1, le=L.MAX_SAMPLE_BATCH)
    device: str = arg("cpu", "torch device (cpu, cuda, cuda:1, mps)")
    quiet: bool = arg(False, "no progress bar")
    runtime: Runtime = arg(
        "eager", "runtime of the U-Net: eager, compile, cudagraphs (CUDA), onnxruntime, openvino"
    )
    precision: Precision = arg(
        "fp32", "U-Net precision; each runtime allows some (README, deploy-time runtimes)"
    )

    def sample_settings(self, steps: int):
        from nas.deploy.runtimes import check_runtime
        from nas.sample import SampleSettings

        check_runtime(self.runtime, self.precision, self.device)  # before any model is loaded
        return SampleSettings(
            steps=steps,
            guidance=self.guidance,
            scheduler=self.scheduler,
            spacing=self.spacing,
            batch_size=self.batch_size,
            runtime=self.runtime,
            precision=self.precision,
        ).check()


class Settings(Sampling):
    command = ("sample",)
    run: str = arg(help="run folder of `nas train` (config.yaml, final/unet_ema/)", positional=True)
    prompt: list[str] | None = arg(None, "one or more prompts (default: 4 captions held out of training)")
    prompts_file: str | None = arg(None, "text file, one prompt a line ('#' lines skipped)", input="file")
    n: int = arg(1, "images per prompt", ge=1, le=MAX_IMAGES)
    out: str | None = arg(None, "output folder (default RUN/samples/<scheduler>-<steps>-seed<K>)")
    steps: int = arg(30, "denoising steps", ge=1, le=MAX_STEPS)
    lora: str | None = arg(None, "LoRA to apply: a `lora:` run of nas train, or a folder with pytorch_lora_weights.safetensors",
                           input="folder")  # fmt: skip
    lora_scale: float = arg(1.0, "strength of --lora (1 = as trained, 0 = none)", ge=-10, le=10)
    controlnet: str | None = arg(None, "ControlNet to steer with: a `controlnet:` run of nas train, or a ControlNet folder",
                                 input="folder")  # fmt: skip
    control_image: str | None = arg(None, "control image for --controlnet (the output size, e.g. a shapes mask)",
                                    input="file")  # fmt: skip
    controlnet_scale: float = arg(1.0, "strength of --controlnet (1 = as trained, 0 = none)", ge=-10, le=10)


SETTINGS = Settings


def check_device(device: str) -> None:
    from nas.core.errors import NasError

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NasError(f"--device {device}: CUDA is not available on this machine (allowed: cpu)")


def run(settings: Settings) -> int:
    from nas.core.errors import NasError
    from nas.sample import read_prompts, sample_run
    from nas.sample.components import lora_choice
    from nas.sample.controlnet import controlnet_choice

    if (settings.controlnet is None) != (settings.control_image is None):
        raise NasError("--controlnet and --control-image go together: a ControlNet steers by an image")
    controlnet = controlnet_choice(settings.controlnet, settings.controlnet_scale, settings.control_image)
    sampling = settings.sample_settings(settings.steps)
    check_device(settings.device)
    prompts = read_prompts(settings.prompt, settings.prompts_file and Path(settings.prompts_file))
    run_dir = Path(settings.run)
    out = (
        Path(settings.out)
        if settings.out
        else run_dir / "samples" / f"{settings.scheduler}-{settings.steps}-seed{settings.seed}"
    )
    paths = sample_run(
        run_dir,
        prompts,
        out,
        sampling,
        n=settings.n,
        seed=settings.seed,
        weights=settings.weights,
        device=settings.device,
        progress=not settings.quiet,
        lora=lora_choice(settings.lora, settings.lora_scale),
        controlnet=controlnet,
    )
    print(f"wrote {len(paths)} images, their JSON sidecars and grid.png to {out}")
    return 0
