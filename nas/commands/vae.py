"""Autoencoders: `nas vae train` trains a small diffusers AutoencoderKL on CPU for the `shapes` data.

The result is a diffusers folder (config.json with the latent scaling factor measured from data,
diffusion_pytorch_model.safetensors) plus vae_train.json with the measured reconstruction quality
(validation PSNR every 500 steps and a verdict), psnr.png and reconstructions.png; the command ends
with the verdict line (nas/data/vae_quality.py).
Real data uses a pretrained VAE folder (e.g. Stable Diffusion's) directly with `nas precompute`.
"""

from __future__ import annotations

import os
from pathlib import Path

from nas.core.settings import CommandSettings, arg, comma_list


class TrainSettings(CommandSettings):
    """train a small AutoencoderKL (default 32x32 -> 8x8x4)"""

    command = ("vae", "train")
    data: str = arg(help="image folder (metadata.jsonl) or tar shards", input="data")
    out: str = arg(help="new folder for the VAE (refused if not empty)")
    resolution: int = arg(32, "training resolution in pixels", ge=8, le=1024)
    channels: list[int] = arg(
        [32, 32, 64],
        "channels per level, comma-separated (default 32,32,64: 3 levels, 32 px -> 8x8 latents; "
        "32,64: 2 levels, 32 px -> 16x16)",
        min_length=1,
        max_length=6,
    )
    steps: int = arg(5000, "optimizer steps", ge=1, le=1_000_000)
    batch: int = arg(4, "images per step", ge=1, le=4096)
    lr: float = arg(5e-4, "peak learning rate", gt=0, le=1)
    seed: int = arg(0, "initialization and batch order seed", ge=0)
    max_images: int | None = arg(None, "use at most this many images (all are held in memory)", ge=1)

    _commas = comma_list("channels")


SETTINGS = {"train": TrainSettings}


def _config(settings: TrainSettings):
    from nas.core.config import validate
    from nas.data.encoders import VaeTrainConfig

    values = {
        "resolution": settings.resolution,
        "block_out_channels": tuple(settings.channels),
        "steps": settings.steps,
        "batch_size": settings.batch,
        "learning_rate": settings.lr,
        "seed": settings.seed,
    }
    config = validate(VaeTrainConfig, values, "command line")
    config.check()
    return config


def dry_run(settings: TrainSettings) -> dict:
    return {"resolved_config": _config(settings).model_dump(mode="json")}


def run(settings: TrainSettings) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    config = _config(settings)

    import torch

    from nas.data.encoders import train_vae
    from nas.data.folders import load_images, open_source

    torch.set_flush_denormal(True)  # tiny activations late in training otherwise slow CPU steps 10x
    source = open_source(settings.data)
    images, _, skips = load_images(source, config.resolution, limit=settings.max_images)
    if skips:  # named before the long run starts; every one goes into vae_train.json
        print(f"vae: {skips.summary()}", flush=True)
    report = train_vae(
        images,
        Path(settings.out),
        config,
        data=settings.data,
        skipped=len(skips),
        skipped_reasons=skips.counts(),
        skipped_items=[s.row() for s in skips],
    )
    print(
        f"vae: validation PSNR {report['val_psnr_db']:.2f} dB (MSE {report['val_mse']:.5f}), "
        f"scaling factor {report['scaling_factor']:.5f}, {report['train_seconds']:.0f} s; "
        f"skipped {report['skipped']}{' (listed in vae_train.json)' if skips else ''}; "
        f"saved to {settings.out}"
    )
    print(report["verdict"]["line"])  # usable or too blurry, against docs/data.md's threshold
    return 0
