"""Autoencoders: `nas vae train` trains a small diffusers AutoencoderKL on CPU for the `shapes` data.

The result is a diffusers folder (config.json with the latent scaling factor measured from data,
diffusion_pytorch_model.safetensors) plus vae_train.json with the measured reconstruction quality.
Real data uses a pretrained VAE folder (e.g. Stable Diffusion's) directly with `nas precompute`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vae_command", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a small AutoencoderKL (default 32x32 -> 8x8x4)")
    p.add_argument("--data", type=Path, required=True, help="image folder (metadata.jsonl) or tar shards")
    p.add_argument("--out", type=Path, required=True, help="new folder for the VAE (refused if not empty)")
    p.add_argument("--resolution", type=int, default=32, help="training resolution in pixels (default 32)")
    p.add_argument(
        "--channels",
        default="32,32,64",
        help="channels per level, comma-separated (default 32,32,64: 3 levels, 32 px -> 8x8 latents; "
        "32,64: 2 levels, 32 px -> 16x16)",
    )
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps (default 5000)")
    p.add_argument("--batch", type=int, default=4, help="images per step (default 4)")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order seed (default 0)")
    p.add_argument("--max-images", type=int, help="use at most this many images (all are held in memory)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def run(args) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from nas.config import validate
    from nas.data.encoders import VaeTrainConfig
    from nas.errors import NasError

    try:
        channels = tuple(int(c) for c in str(args.channels).split(",") if c.strip())
    except ValueError:
        raise NasError(
            f"--channels {args.channels!r}: expected comma-separated integers, e.g. 32,32,64"
        ) from None
    overrides = {
        "resolution": args.resolution,
        "block_out_channels": channels,
        "steps": args.steps,
        "batch_size": args.batch,
        "learning_rate": args.lr,
        "seed": args.seed,
    }
    config = validate(VaeTrainConfig, overrides, "command line")
    config.check()
    if args.dry_run:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0

    import torch

    from nas.data.encoders import train_vae
    from nas.data.folders import load_images, open_source

    torch.set_flush_denormal(True)  # tiny activations late in training otherwise slow CPU steps 10x
    source = open_source(args.data)
    images, _, skipped = load_images(source, config.resolution, limit=args.max_images)
    report = train_vae(images, args.out, config, data=str(args.data), skipped=sum(skipped.values()))
    print(
        f"vae: validation PSNR {report['val_psnr_db']:.2f} dB (MSE {report['val_mse']:.5f}), "
        f"scaling factor {report['scaling_factor']:.5f}, {report['train_seconds']:.0f} s; "
        f"skipped {report['skipped']}; saved to {args.out}"
    )
    return 0
