"""`nas vae train` says how good the VAE is: validation PSNR every `val_every` steps, a reconstruction
picture, a PSNR plot and a one-line verdict with a recommended step count (nas/data/vae_quality.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nas.cli import main
from nas.data.encoders import VaeTrainConfig, load_vae, reconstruct, train_vae, weights_sha256
from nas.data.vae_quality import (
    GRID_IMAGES,
    MIN_STEPS,
    USABLE_PSNR_DB,
    recommended_steps,
    to_pixels,
    verdict,
)

TINY = dict(block_out_channels=(16, 16, 32), batch_size=4, val_images=8, learning_rate=2e-3)


def test_recommended_steps_rule():
    assert recommended_steps(300) == recommended_steps(1499) == 6000  # measured: 3,000 too few on 273 images
    assert recommended_steps(1500) == recommended_steps(6000) == MIN_STEPS == 3000
    assert recommended_steps(7001) == 4000  # 0.5 steps per image, rounded up to 500
    assert recommended_steps(20000) == 10000


def test_verdict_lines():
    good = verdict(USABLE_PSNR_DB + 0.5, 3000, 1783, "vae/reconstructions.png")
    assert good["usable"] and good["line"].startswith("vae verdict: usable: validation PSNR 25.00 dB")
    short = verdict(14.04, 800, 300, "vae/reconstructions.png")  # the new user's run
    assert not short["usable"] and short["recommended_steps"] == 6000
    assert "too blurry" in short["line"] and "after 800 steps" in short["line"]
    assert "--steps 6000 is recommended for 300 images" in short["line"]
    assert "vae/reconstructions.png" in short["line"] and "docs/data.md" in short["line"]
    long = verdict(20.0, 5000, 3000, "r.png")  # past the rule already: longer, or larger latents
    assert long["recommended_steps"] == 10000 and "--channels 32,64" in long["line"]
    assert all("\n" not in v["line"] for v in (good, short, long))


def test_train_vae_writes_curve_picture_plot_and_verdict(shapes_images, tmp_path):
    config = VaeTrainConfig(**TINY, steps=6, val_every=2)
    report = train_vae(shapes_images, tmp_path / "vae", config)
    folder = tmp_path / "vae"
    saved = json.loads((folder / "vae_train.json").read_text())
    assert [p["step"] for p in saved["validation"]] == [2, 4, 6]
    assert saved["validation"][-1]["val_psnr_db"] == saved["val_psnr_db"] == report["val_psnr_db"]
    assert all(np.isfinite(p["train_loss"]) and p["val_mse"] > 0 for p in saved["validation"])
    assert saved["verdict"]["line"] == report["verdict"]["line"]
    assert saved["verdict"]["usable"] is False and "too blurry" in saved["verdict"]["line"]
    steps = recommended_steps(len(shapes_images))
    assert f"--steps {steps} is recommended for {len(shapes_images)} images" in saved["verdict"]["line"]
    assert Image.open(folder / "psnr.png").size[0] >= 300
    # reconstructions.png: the first 8 held-out images (fixed by the seed) over their reconstructions
    order = torch.randperm(len(shapes_images), generator=torch.Generator().manual_seed(config.seed))
    shown = shapes_images[order[:GRID_IMAGES]]
    want = [to_pixels(shown).numpy(), to_pixels(reconstruct(load_vae(folder), shown)).numpy()]
    grid = np.asarray(Image.open(folder / "reconstructions.png"))
    left, top = grid.shape[1] - (8 * 98 + 2), grid.shape[0] - (2 * 98 + 2)
    assert left > 0 and top > 0  # row labels and the title in margins
    for row in range(2):
        for col in range(GRID_IMAGES):
            y, x = top + 2 + row * 98, left + 2 + col * 98
            cell = grid[y : y + 96, x : x + 96]
            assert np.array_equal(cell, want[row][col].repeat(3, 0).repeat(3, 1)), (row, col)
    assert (grid[top:, :left] < 128).any(axis=2).sum() > 50  # "original", "reconstruction"


def test_validation_passes_do_not_change_the_weights(shapes_images, tmp_path):
    often = train_vae(shapes_images, tmp_path / "often", VaeTrainConfig(**TINY, steps=4, val_every=1))
    once = train_vae(shapes_images, tmp_path / "once", VaeTrainConfig(**TINY, steps=4))  # 500: only the end
    assert len(often["validation"]) == 4 and [p["step"] for p in once["validation"]] == [4]
    assert weights_sha256(tmp_path / "often") == weights_sha256(tmp_path / "once")
    assert often["val_psnr_db"] == once["val_psnr_db"]


def test_nas_vae_train_ends_with_the_verdict(shapes_dir, tmp_path, capsys):
    out = tmp_path / "vae"
    argv = ["vae", "train", "--data", str(shapes_dir / "train"), "--out", str(out)]
    assert main([*argv, "--steps", "3", "--channels", "16,16,32", "--batch", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("vae verdict: too blurry: validation PSNR ")
    assert f"look at {out / 'reconstructions.png'}" in last
    assert {"reconstructions.png", "psnr.png", "vae_train.json"} <= {p.name for p in out.iterdir()}


def test_val_every_must_be_positive():
    from nas.core.errors import NasError

    with pytest.raises(NasError, match="val_every: must be at least 1"):
        VaeTrainConfig(val_every=0).check()
