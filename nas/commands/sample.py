"""Draw images from a trained run: diffusers schedulers configured as the run was trained, trailing
timesteps (t = 0 is never evaluated), classifier-free guidance against the cached empty caption, EMA
weights by default. Writes one PNG and one JSON sidecar per image and a grid (one row per prompt)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_sampling_arguments(p: argparse.ArgumentParser, steps: bool = True) -> None:
    """Flags shared by `nas sample`, `nas eval` and `nas compare`."""
    if steps:
        p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 = none")
    p.add_argument(
        "--scheduler", default="ddim", help="ddim, dpmpp (DPM-Solver++ 2M) or euler (default ddim)"
    )
    p.add_argument(
        "--spacing",
        default="trailing",
        help="timestep grid: trailing (default; never evaluates t=0, Lin et al. 2023), leading, linspace",
    )
    p.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    p.add_argument("--weights", default="auto", help="auto (EMA if the run has it), ema or raw")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder of `nas train` (config.yaml, final/unet_ema/)")
    p.add_argument(
        "--prompt", nargs="+", help="one or more prompts (default: 4 captions held out of training)"
    )
    p.add_argument("--prompts-file", type=Path, help="text file, one prompt a line ('#' lines skipped)")
    p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/samples/<scheduler>-<steps>-seed<K>)")
    add_sampling_arguments(p)


def check_device(device: str) -> None:
    from nas.errors import NasError

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NasError(f"--device {device}: CUDA is not available on this machine (allowed: cpu)")


def settings_from(args, steps: int | None = None):
    from nas import limits as L
    from nas.errors import NasError
    from nas.sample import SampleSettings

    if not 0 <= args.seed <= L.MAX_SEED:
        raise NasError(f"--seed must be in 0..{L.MAX_SEED}, got {args.seed}")
    return SampleSettings(
        steps=args.steps if steps is None else steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
        spacing=args.spacing,
        batch_size=args.batch_size,
    ).check()


def run(args) -> int:
    from nas import limits as L
    from nas.errors import NasError
    from nas.sample import read_prompts, sample_run

    settings = settings_from(args)
    if not 1 <= args.n <= L.MAX_IMAGES:
        raise NasError(f"--n must be in 1..{L.MAX_IMAGES}, got {args.n}")
    check_device(args.device)
    prompts = read_prompts(args.prompt, args.prompts_file)
    out = args.out or args.run / "samples" / f"{args.scheduler}-{args.steps}-seed{args.seed}"
    paths = sample_run(
        args.run,
        prompts,
        out,
        settings,
        n=args.n,
        seed=args.seed,
        weights=args.weights,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"wrote {len(paths)} images, their JSON sidecars and grid.png to {out}")
    return 0
