"""Export a trained run as a diffusers StableDiffusionPipeline folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json; safetensors; a FlexUNet's code in unet/flex_unet.py) that
`StableDiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)` loads offline without `nas`
and runs with a plain text prompt, giving the images `nas sample` gives."""

from __future__ import annotations

from pathlib import Path

from nas.commands.sample import Scheduler, Spacing, Weights
from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("export-pipeline",)
    run: str = arg(help="run folder of `nas train` (config.yaml, final/unet_ema/)", positional=True)
    out: str = arg(help="pipeline folder to write (must be new or empty)")
    scheduler: Scheduler = arg("ddim", "scheduler saved in the folder")
    spacing: Spacing = arg("trailing", "timestep grid")
    weights: Weights = arg("auto", "auto (EMA if the run has it), ema or raw")


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.sample import export_pipeline

    out = Path(settings.out)
    info = export_pipeline(Path(settings.run), out, settings.scheduler, settings.spacing, settings.weights)
    trust = ", trust_remote_code=True" if info["unet_code"] else ""  # code shipped in unet/
    print(
        f"exported {info['unet_class']} ({info['weights']} weights) with {info['scheduler_class']} to {out};"
        f" load with StableDiffusionPipeline.from_pretrained({str(out)!r}{trust})"
    )
    return 0
