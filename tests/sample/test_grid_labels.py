"""`nas sample`'s grid.png names what it shows: each row's prompt on the left, each column's seed and
the settings on top, in margins outside the cells (nas/sample/generate.py, `sample_grid`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from nas.core.grid import GRID_PAD, MAX_ROW_LABEL_PX
from nas.sample.generate import SampleSettings, image_grid, jobs_for, sample_grid

PROMPTS = ["red stripes", "a blue ring on a black background"]  # the second is the widest label
SETTINGS = SampleSettings(steps=30, guidance=7.5)


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _split(grid: np.ndarray, columns: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left margin, top band, cells) of a grid with 96 px cells."""
    left = grid.shape[1] - (columns * (96 + GRID_PAD) + GRID_PAD)
    top = grid.shape[0] - (rows * (96 + GRID_PAD) + GRID_PAD)
    return grid[top:, :left], grid[:top], grid[top:, left:]


def test_rows_carry_their_prompt_and_the_top_the_settings():
    pixels = _pixels(6)
    jobs = jobs_for(PROMPTS, 3, seed=0)
    grid = sample_grid(pixels, jobs, SETTINGS, columns=3, weights="ema")
    margin, band, cells = _split(grid, 3, 2)
    assert margin.shape[1] > 0 and band.shape[0] > 0
    assert np.array_equal(cells, image_grid(pixels, 3))  # the cells are the unlabelled grid, untouched
    assert (margin < 128).any(axis=2).sum() > 100 and (band < 128).any(axis=2).sum() > 100
    # Another prompt changes only the left margin; other settings change only the top band.
    other = sample_grid(pixels, jobs_for(["checkerboard", PROMPTS[1]], 3, 0), SETTINGS, 3, "ema")
    m2, b2, c2 = _split(other, 3, 2)
    assert np.array_equal(c2, cells) and np.array_equal(b2, band)
    assert not np.array_equal(m2[:98], margin[:98]) and np.array_equal(m2[98:], margin[98:])
    steps50 = sample_grid(pixels, jobs, replace(SETTINGS, steps=50), 3, "ema")
    m3, b3, c3 = _split(steps50, 3, 2)
    assert np.array_equal(c3, cells) and np.array_equal(m3, margin) and not np.array_equal(b3, band)
    seeds5 = sample_grid(pixels, jobs_for(PROMPTS, 3, seed=5), SETTINGS, 3, "ema")
    assert not np.array_equal(seeds5, grid)  # the column labels are the seeds


def test_a_long_prompt_is_cut_to_the_margin():
    long_prompt = " ".join(["on a white background, a small red circle in the top left"] * 6)
    grid = sample_grid(_pixels(1), jobs_for([long_prompt], 1, 0), SETTINGS, columns=1)
    margin, _, cells = _split(grid, 1, 1)
    assert margin.shape[1] == MAX_ROW_LABEL_PX and cells.shape[:2] == (100, 100)
    ink_rows = (margin < 128).any(axis=(1, 2))
    assert ink_rows[:98].any() and not ink_rows[98:].any()  # wrapped lines stop at the row's height
