"""Is a trained VAE good enough? Validation PSNR over steps, a picture of reconstructions, a verdict.

`nas vae train` (nas/data/encoders.py, `train_vae`) measures validation PSNR every `val_every` steps
and at the end, and writes beside the model: `psnr.png` (PSNR against steps, the threshold dashed),
`reconstructions.png` (8 held-out images over their reconstructions) and, in `vae_train.json`,
`validation` (the curve) and `verdict`. The verdict line compares the final validation PSNR with
USABLE_PSNR_DB and recommends a step count for the data size. Where the figures come from:
docs/data.md, "Is the VAE good enough".
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Validation PSNR below which a VAE is called too blurry (dB, [0, 1] scale, posterior mean). The
# repo's measured VAEs on the shapes data (alignment of the shapes evaluator on their reconstructions,
# the ceiling of any U-Net trained on their latents): 21.4 dB -> 0.44, 24.6 dB -> 0.68, 24.75 dB
# (the quickstart VAE) -> 0.74, 27.97 dB -> 0.87. Below 24.5 dB no measured VAE kept a ceiling of 0.68.
USABLE_PSNR_DB = 24.5
# Optimizer steps: the quickstart's VAE, 24.75 dB on 1,583 shapes images (docs/data.md).
MIN_STEPS = 3000
# Below this many images 3,000 steps were not enough: on 273 shapes images (219 train + 54 held out)
# 3,000 steps reached 23.52 dB and 6,000 reached 25.77 dB (24.66 dB at 3,500); docs/data.md.
SMALL_DATA_IMAGES = 1500
SMALL_DATA_STEPS = 6000
# Beyond 6,000 images (the most a step count was measured on: 5,398): 2 passes at batch 4, 0.5 steps
# per image; an extrapolation, not measured. Up to 6,000 images the rule gives MIN_STEPS.
STEPS_PER_IMAGE = 0.5
STEP_ROUND = 500  # recommendations are rounded up to this many steps
GRID_IMAGES = 8  # held-out images in reconstructions.png (the first 8 of the seeded split)
DOC = "docs/data.md, 'Is the VAE good enough'"


def _round_up(steps: float) -> int:
    return int(math.ceil(steps / STEP_ROUND) * STEP_ROUND)


def recommended_steps(n_images: int) -> int:
    """Steps for `n_images` images: SMALL_DATA_STEPS below SMALL_DATA_IMAGES, MIN_STEPS up to 6,000
    images, then 0.5 steps per image."""
    if n_images < SMALL_DATA_IMAGES:
        return SMALL_DATA_STEPS
    return _round_up(max(MIN_STEPS, STEPS_PER_IMAGE * n_images))


def verdict(val_psnr_db: float, steps: int, n_images: int, picture: Path | str) -> dict:
    """{usable, threshold_db, recommended_steps, line}: the one line `nas vae train` ends with."""
    recommended = recommended_steps(n_images)
    usable = val_psnr_db >= USABLE_PSNR_DB
    measured = f"validation PSNR {val_psnr_db:.2f} dB"
    if usable:
        line = f"vae verdict: usable: {measured} >= {USABLE_PSNR_DB} dB; look at {picture}"
    elif steps < recommended:
        line = (
            f"vae verdict: too blurry: {measured} < {USABLE_PSNR_DB} dB after {steps} steps; train longer: "
            f"--steps {recommended} is recommended for {n_images} images, or keep more detail with 16x16 "
            f"latents (--channels 32,64); look at {picture} ({DOC})"
        )
    else:
        recommended = _round_up(2 * steps)  # already past the rule: double it, or more detail
        line = (
            f"vae verdict: too blurry: {measured} < {USABLE_PSNR_DB} dB after {steps} steps; train longer "
            f"(--steps {recommended}) or keep more detail with 16x16 latents (--channels 32,64); "
            f"look at {picture} ({DOC})"
        )
    return {
        "usable": usable,
        "threshold_db": USABLE_PSNR_DB,
        "recommended_steps": recommended,
        "images": n_images,
        "line": line,
    }


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [N, 3, H, W] to uint8 [N, H, W, 3], as diffusers' image processor rounds."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def write_reconstructions(
    path: Path, originals: torch.Tensor, reconstructions: torch.Tensor, title: str
) -> None:
    """`path`: originals in the top row, their reconstructions under them, labelled, enlarged."""
    from PIL import Image

    from nas.core.grid import labelled_grid

    pixels = torch.cat([to_pixels(originals), to_pixels(reconstructions)]).numpy()
    grid, _ = labelled_grid(pixels, len(originals), row_labels=["original", "reconstruction"], title=title)
    Image.fromarray(grid).save(path)


def write_psnr_plot(path: Path, curve: list[dict], title: str) -> None:
    """`path`: validation PSNR against steps, with the USABLE_PSNR_DB threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [point["step"] for point in curve]
    values = [point["val_psnr_db"] for point in curve]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(steps, values, marker="o", label="validation PSNR")
    ax.axhline(USABLE_PSNR_DB, color="gray", linestyle="--", label=f"usable ({USABLE_PSNR_DB} dB)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
