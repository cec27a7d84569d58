"""Train a U-Net on a latent cache with a training recipe (a preset name or a YAML file).

Presets: decidiffusion (default recipe: cosine, zero terminal SNR, v-prediction, Min-SNR gamma=5,
EMA for the last 5%), sd15 (SD 1.5's recipe), tiny (a CPU-sized run). The run folder gets the
resolved config, the architecture, env.json, metrics.csv, loss.png, checkpoints/ and final/.
Several GPUs: `accelerate launch --num_processes N -m nas train ...` (same code path).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config YAML, or a preset name: decidiffusion, sd15, tiny")
    p.add_argument("--arch", type=Path, help="architecture YAML (default: the config's arch:)")
    p.add_argument(
        "--cache", type=Path, help="latent cache folder from `nas precompute` (default: the config's cache:)"
    )
    p.add_argument("--out", type=Path, help="run folder (default: results/train/<arch name>-<config name>)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, values in YAML syntax: lr=2e-4 ema.start=0.9 ema=null",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from nas.config import dump_yaml
    from nas.train.config import load_config

    config = load_config(args.config, args.overrides, max_steps=args.max_steps)
    if args.dry_run:
        print(dump_yaml(config), end="")
        return 0

    from nas.train.loop import train_arch

    result = train_arch(config, args.arch, args.cache, out=args.out, resume=args.resume, quiet=args.quiet)
    if result.run_dir is not None:
        ema = f", EMA {result.val_loss_ema:.5f}" if result.val_loss_ema is not None else ""
        print(
            f"trained {result.step} steps: validation loss {result.val_loss:.5f}{ema}; run folder {result.run_dir}"
        )
    return 0
