"""A blind side-by-side survey of two runs: the same prompts and seeds through both (default 10
prompts x 3 images, 50 steps for A, 30 for B), pairs in random left/right order on a static HTML
page with a vote per pair on prompt adherence and aesthetics; the page builds the votes JSON and
offers it as a download. `nas compare --tally votes*.json` adds up the voters' files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nas.commands.sample import add_sampling_arguments, check_device, settings_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", type=Path, nargs="*", metavar="RUN", help="RUN_A RUN_B: two run folders of `nas train`"
    )
    p.add_argument(
        "--prompts-file", type=Path, help="one prompt a line (default: 10 captions held out of A's training)"
    )
    p.add_argument("--steps-a", type=int, default=50, help="denoising steps for A (default 50)")
    p.add_argument("--steps-b", type=int, default=30, help="denoising steps for B (default 30)")
    p.add_argument("--n", type=int, default=3, help="images per prompt and model (default 3)")
    p.add_argument("--page-seed", type=int, default=0, help="seed of the left/right order")
    p.add_argument("--out", type=Path, help="new folder for index.html and images/")
    p.add_argument("--tally", type=Path, nargs="+", metavar="VOTES", help="add up votes files instead")
    add_sampling_arguments(p, steps=False)


def run(args) -> int:
    from nas.errors import NasError

    if args.tally:
        from nas.evaluate.ab_page import tally

        result = tally(args.tally)
        print(json.dumps(result, indent=2))
        return 0
    if len(args.runs) != 2:
        raise NasError(
            f"expected two run folders RUN_A RUN_B, got {len(args.runs)} (or use --tally VOTES...)"
        )
    if args.out is None:
        raise NasError("--out DIR is required (the folder for index.html and images/)")
    from nas.evaluate.ab_page import build_compare
    from nas.sample import read_prompts
    from nas.sample.run import held_out_captions

    settings_a = settings_from(args, steps=args.steps_a)
    settings_b = settings_from(args, steps=args.steps_b)
    check_device(args.device)
    prompts = read_prompts(None, args.prompts_file)
    if prompts is None:
        prompts = held_out_captions(args.runs[0], 10)
    summary = build_compare(
        args.runs[0],
        args.runs[1],
        prompts,
        args.out,
        settings_a,
        settings_b,
        n=args.n,
        seed=args.seed,
        page_seed=args.page_seed,
        weights=args.weights,
        device=args.device,
        progress=not args.quiet,
    )
    print(f"wrote {summary['pairs']} pairs to {args.out / 'index.html'}; open it in a browser")
    return 0
