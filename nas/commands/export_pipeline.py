"""Export a trained run as a diffusers StableDiffusionPipeline folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json; safetensors) that `StableDiffusionPipeline.from_pretrained`
loads offline and runs with a plain text prompt, giving the images `nas sample` gives."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder of `nas train` (config.yaml, final/unet_ema/)")
    p.add_argument("--out", type=Path, required=True, help="pipeline folder to write (must be new or empty)")
    p.add_argument("--scheduler", default="ddim", help="scheduler saved in the folder: ddim, dpmpp, euler")
    p.add_argument(
        "--spacing", default="trailing", help="timestep grid: trailing (default), leading, linspace"
    )
    p.add_argument("--weights", default="auto", help="auto (EMA if the run has it), ema or raw")


def run(args) -> int:
    from nas.sample import export_pipeline

    info = export_pipeline(args.run, args.out, args.scheduler, args.spacing, args.weights)
    print(
        f"exported {info['unet_class']} ({info['weights']} weights) with {info['scheduler_class']} to {args.out};"
        f" load with StableDiffusionPipeline.from_pretrained({str(args.out)!r})"
    )
    return 0
