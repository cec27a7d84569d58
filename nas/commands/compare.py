"""A blind side-by-side survey of two runs: the same prompts and seeds through both (default 10
prompts x 3 images, 50 steps for A, 30 for B), pairs in random left/right order on a static HTML
page with a vote per pair on prompt adherence and aesthetics; the page builds the votes JSON and
offers it as a download. `nas compare --tally votes*.json` adds up the voters' files."""

from __future__ import annotations

import json
from pathlib import Path

from nas.commands.sample import MAX_IMAGES, MAX_STEPS, Sampling, check_device
from nas.core.settings import arg


class Settings(Sampling):
    command = ("compare",)
    runs: list[str] = arg([], "RUN_A RUN_B: two run folders of `nas train`", positional=True)
    prompts_file: str | None = arg(
        None, "one prompt a line (default: 10 captions held out of A's training)", input="file"
    )
    steps_a: int = arg(50, "denoising steps for A", ge=1, le=MAX_STEPS)
    steps_b: int = arg(30, "denoising steps for B", ge=1, le=MAX_STEPS)
    n: int = arg(3, "images per prompt and model", ge=1, le=MAX_IMAGES)
    page_seed: int = arg(0, "seed of the left/right order", ge=0)
    out: str | None = arg(None, "new folder for index.html and images/")
    tally: list[str] | None = arg(None, "add up votes files instead")


SETTINGS = Settings


def run(settings: Settings) -> int:
    from nas.core.errors import NasError

    if settings.tally:
        from nas.evaluate.ab_page import tally

        result = tally([Path(p) for p in settings.tally])
        print(json.dumps(result, indent=2))
        return 0
    if len(settings.runs) != 2:
        raise NasError(
            f"expected two run folders RUN_A RUN_B, got {len(settings.runs)} (or use --tally VOTES...)"
        )
    if settings.out is None:
        raise NasError("--out DIR is required (the folder for index.html and images/)")
    from nas.evaluate.ab_page import build_compare
    from nas.sample import read_prompts
    from nas.sample.components import held_out_captions

    run_a, run_b, out = Path(settings.runs[0]), Path(settings.runs[1]), Path(settings.out)
    settings_a = settings.sample_settings(settings.steps_a)
    settings_b = settings.sample_settings(settings.steps_b)
    check_device(settings.device)
    prompts = read_prompts(None, settings.prompts_file and Path(settings.prompts_file))
    if prompts is None:
        prompts = held_out_captions(run_a, 10)
    summary = build_compare(
        run_a,
        run_b,
        prompts,
        out,
        settings_a,
        settings_b,
        n=settings.n,
        seed=settings.seed,
        page_seed=settings.page_seed,
        weights=settings.weights,
        device=settings.device,
        progress=not settings.quiet,
    )
    from nas.sample.timing import split_line

    for tag, cost in summary["cost"].items():
        print(f"{tag}: {split_line(cost)}")
    a, b = summary["cost"]["A"]["images_per_s"], summary["cost"]["B"]["images_per_s"]
    print(f"B/A end-to-end images/s: {b / a:.2f}x (one process, A then B)")
    print(f"wrote {summary['pairs']} pairs to {out / 'index.html'}; open it in a browser")
    return 0
