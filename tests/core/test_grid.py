"""Grids of images: cells hold the images pixel for pixel, labels go in added margins, text is cut
to fit (nas/core/grid.py)."""

from __future__ import annotations

import numpy as np
import pytest

from nas.core.grid import BACKGROUND, GRID_PAD, LINE_PX, MAX_ROW_LABEL_PX, fit_lines, font, labelled_grid


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _cells_are_the_images(grid: np.ndarray, layout, images: np.ndarray) -> None:
    s = layout.scale
    for i, image in enumerate(images):
        y0, x0, y1, x1 = layout.box(i)
        cell = grid[y0:y1, x0:x1]
        assert np.array_equal(cell, image.repeat(s, 0).repeat(s, 1)), f"cell {i}"
        assert np.array_equal(cell[::s, ::s], image)  # every pixel of the image, byte for byte


def test_plain_grid_is_cells_and_borders_only():
    images = _images(5)
    grid, layout = labelled_grid(images, columns=3)
    assert (layout.left, layout.top, layout.scale, layout.rows) == (0, 0, 3, 2)  # 32 px -> 96 px cells
    assert grid.shape == (2 * (96 + GRID_PAD) + GRID_PAD, 3 * (96 + GRID_PAD) + GRID_PAD, 3)
    _cells_are_the_images(grid, layout, images)
    assert (grid[:GRID_PAD] == BACKGROUND).all() and (grid[:, :GRID_PAD] == BACKGROUND).all()
    y0, x0, y1, x1 = layout.box(5)  # the sixth place of the 2x3 grid is empty
    assert (grid[y0:y1, x0:x1] == BACKGROUND).all()
    big = _images(2, size=128)
    grid, layout = labelled_grid(big, columns=2)
    assert layout.scale == 1 and grid.shape == (128 + 2 * GRID_PAD, 2 * 128 + 3 * GRID_PAD, 3)


def test_labels_go_in_added_margins_and_leave_cells_alone():
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8) + 255  # white cells: text inside would show
    rows = ["a small red circle in the top left on a white background", "stripes"]
    grid, layout = labelled_grid(images, 2, row_labels=rows, column_labels=["seed 0", "seed 1"],
                                 title="30 steps, guidance 7.5, ddim (trailing)")  # fmt: skip
    _cells_are_the_images(grid, layout, images)
    assert 0 < layout.left <= MAX_ROW_LABEL_PX and layout.top >= 2 * LINE_PX
    assert grid.shape[1] == layout.left + 2 * (96 + GRID_PAD) + GRID_PAD
    ink = (grid < 200).any(axis=2)
    for r in range(2):  # each row's label sits in the left margin beside that row
        y0, _, y1, _ = layout.box(2 * r)
        assert ink[y0:y1, : layout.left].sum() > 20, f"row {r} label"
    assert ink[: layout.top - LINE_PX].sum() > 20  # title
    for c in range(2):  # each column's label over that column
        _, x0, _, x1 = layout.box(c)
        assert ink[layout.top - LINE_PX : layout.top, x0:x1].sum() > 10, f"column {c} label"
    # the long prompt wraps onto more lines than the short one
    rows_ink = [
        ink[layout.box(2 * r)[0] : layout.box(2 * r)[2], : layout.left].any(axis=1).sum() for r in (0, 1)
    ]
    assert rows_ink[0] > rows_ink[1]


def test_fit_lines_wraps_and_cuts_with_an_ellipsis():
    face = font()
    assert fit_lines("seed 3", face, 200, 1) == ["seed 3"]
    text = "on a white background, a small red circle in the top left and large blue square at the bottom"
    lines = fit_lines(text, face, 90, 3)
    assert len(lines) == 3 and lines[-1].endswith("...")
    assert all(face.getlength(line) <= 90 for line in lines)
    assert " ".join(lines).replace("...", "").split()[:3] == text.split()[:3]
    whole = fit_lines(text, face, 90, 20)
    assert " ".join(whole) == text  # room enough: nothing cut, nothing added
    word = fit_lines("checkerboardcheckerboardcheckerboard", face, 40, 2)
    assert len(word) == 2 and all(face.getlength(line) <= 40 for line in word) and word[1].endswith("...")
    assert fit_lines(text, face, 90, 0) == []


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        labelled_grid(np.zeros((2, 8, 8, 3), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="columns"):
        labelled_grid(_images(2), 0)
