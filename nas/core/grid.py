"""Pictures of many images: equal cells in a grid, with labels in margins added around them.

The cells hold the images pixel for pixel (small images are enlarged by a whole factor, nearest
neighbour, so nothing is invented), and every label goes into a margin outside the cells: a title
band on top, one label per column under it, one per row on the left. So a cell of the grid equals
its image repeated `scale` times along each side, byte for byte. Text uses PIL's built-in font
(`ImageFont.load_default`: no font file, no download).

Used by `nas sample` (grid.png with prompts and settings), `nas eval` (grid_<steps>.png, unlabelled)
and `nas vae train` (reconstructions.png). A base layer: numpy here, PIL inside the functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

GRID_PAD = 2  # px of white border around and between cells
MIN_CELL = 96  # px: smaller images are enlarged by a whole factor to at least this (32 px -> x3)
FONT_PX = 11  # px, PIL's built-in font (Aileron, FreeType builds) at this size: ~5.5 px per character
LINE_PX = 13  # px from one text line to the next at FONT_PX
TEXT_PAD = 4  # px between a label and the edge of its margin
MAX_ROW_LABEL_PX = 220  # px: the widest left margin; longer labels wrap, and are cut with "..."
TITLE_LINES = 3  # lines at most in the title band; a longer title is cut with "..."
BACKGROUND = 255  # white
INK = (32, 32, 32)  # near-black text


@dataclass(frozen=True)
class Layout:
    """Where the cells of a grid are: cell i is at rows/columns position divmod(i, columns)."""

    rows: int
    columns: int
    cell_height: int  # px, after enlarging
    cell_width: int
    scale: int  # whole enlargement factor of each image
    pad: int
    left: int  # px of label margin on the left (0: no row labels)
    top: int  # px of title and column-label band on top (0: none)

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of cell i in the grid array."""
        r, c = divmod(i, self.columns)
        y = self.top + self.pad + r * (self.cell_height + self.pad)
        x = self.left + self.pad + c * (self.cell_width + self.pad)
        return y, x, y + self.cell_height, x + self.cell_width


def font(size: int = FONT_PX) -> Any:
    """PIL's built-in font at `size` px (a bitmap font, size ignored, where PIL lacks FreeType)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def fit_lines(text: str, face: Any, width: int, max_lines: int) -> list[str]:
    """`text` word-wrapped to `width` px in `face`, at most `max_lines` lines; what does not fit is
    cut and the last line ends with "..." (a word wider than a line is cut inside the word)."""
    if max_lines < 1 or width < 1:
        return []
    lines: list[str] = []
    words = text.split()
    current = ""
    while words:
        word = words[0]
        candidate = f"{current} {word}" if current else word
        if face.getlength(candidate) <= width:
            current, words = candidate, words[1:]
            continue
        if not current:  # one word wider than the line: cut it where it stops fitting
            cut = 1
            while cut < len(word) and face.getlength(word[: cut + 1]) <= width:
                cut += 1
            current = word[:cut]
            words = [word[cut:], *words[1:]] if cut < len(word) else words[1:]
        lines.append(current)
        current = ""
        if len(lines) == max_lines:
            break
    if current and len(lines) < max_lines:
        lines.append(current)
    if words and lines:  # text left over: mark the cut on the last line
        last = lines[-1]
        while last and face.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def labelled_grid(
    images: np.ndarray,
    columns: int,
    *,
    row_labels: list[str] | None = None,
    column_labels: list[str] | None = None,
    title: str | None = None,
    pad: int = GRID_PAD,
    min_cell: int = MIN_CELL,
) -> tuple[np.ndarray, Layout]:
    """uint8 [N, H, W, 3] tiled row by row, `columns` wide, with a white border, and its Layout.

    Images under `min_cell` px high are enlarged by a whole factor (nearest neighbour). Labels go in
    added margins and never cover a cell: `title` on top (wrapped, at most 3 lines), one
    `column_labels` entry over each column (cut to the cell width), one `row_labels` entry left of
    each row (wrapped to the margin, cut to the row height). Without labels it is the plain grid.
    """
    from PIL import Image, ImageDraw

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    scale = max(1, math.ceil(min_cell / max(images.shape[1], 1)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    count, h, w, _ = images.shape
    rows = math.ceil(count / columns)
    face = font() if (row_labels or column_labels or title) else None
    left = 0
    if row_labels and face is not None:
        widest = max((face.getlength(label) for label in row_labels), default=0)
        left = min(MAX_ROW_LABEL_PX, math.ceil(widest) + 2 * TEXT_PAD)
    width = left + columns * (w + pad) + pad
    title_lines = fit_lines(title, face, width - 2 * TEXT_PAD, TITLE_LINES) if title and face else []
    top = (len(title_lines) + (1 if column_labels else 0)) * LINE_PX
    top += TEXT_PAD if top else 0
    layout = Layout(rows, columns, h, w, scale, pad, left, top)
    canvas = Image.new("RGB", (width, top + rows * (h + pad) + pad), (BACKGROUND,) * 3)
    if face is not None:
        draw = ImageDraw.Draw(canvas)
        for k, line in enumerate(title_lines):
            draw.text((TEXT_PAD, TEXT_PAD + k * LINE_PX), line, fill=INK, font=face)
        y_columns = TEXT_PAD + len(title_lines) * LINE_PX
        for c, label in enumerate((column_labels or [])[:columns]):
            x = layout.box(c)[1]
            for line in fit_lines(label, face, w, 1):
                draw.text((x, y_columns), line, fill=INK, font=face)
        for r, label in enumerate((row_labels or [])[:rows]):
            y = layout.box(r * columns)[0]
            for k, line in enumerate(fit_lines(label, face, left - 2 * TEXT_PAD, max(1, h // LINE_PX))):
                draw.text((TEXT_PAD, y + k * LINE_PX), line, fill=INK, font=face)
    grid = np.array(canvas)
    for i, image in enumerate(images):  # last, so the cells hold the images whatever the text did
        y0, x0, y1, x1 = layout.box(i)
        grid[y0:y1, x0:x1] = image
    return grid, layout
