"""Condition images of a shapes latent cache, for ControlNet training (nas/train/controlnet.py) and
for sampling against a shapes record (`nas eval --controlnet`).

Nothing extra is stored in the cache: image `index` of the shapes dataset of seed `seed` is drawn
from `numpy.random.default_rng([seed, index])` (nas/data/shapes.py), so its mask or edge map is
re-drawn from the same draws, at any size, exactly where the image has its objects. A cache's
records.jsonl holds each item's shapes `index` and labels; the dataset's seed is in the shapes.json
that `nas data shapes` writes beside its splits (found from the cache's source path). Each re-drawn
scene and caption is compared with the record, so a wrong seed or a changed dataset is an error,
never a silently wrong condition.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nas.core.errors import NasError
from nas.data import shapes

SHAPES_INFO = "shapes.json"  # written by shapes.write beside train/ and validation/
KEEP_PIXELS = 128 * 128  # drawn conditions up to this size are kept (48 KB each); larger are re-drawn


def shapes_info_file(cache) -> Path | None:
    """The shapes.json of the dataset a cache was made from: beside its source folder or in it; a
    relative source path is tried from the working directory and from each folder above the cache."""
    source = Path(str(cache.manifest.get("source", {}).get("path", "")))
    if not str(source):
        return None
    roots = (
        [Path.cwd(), *Path(str(cache.path)).resolve().parents] if not source.is_absolute() else [Path("/")]
    )
    for root in roots:
        for folder in (root / source, (root / source).parent):
            if (folder / SHAPES_INFO).is_file():
                return folder / SHAPES_INFO
    return None


def condition_tensor(image) -> torch.Tensor:
    """A PIL condition image as float [3, H, W] in [0, 1] (what StableDiffusionControlNetPipeline
    feeds the ControlNet: its image processor does not normalise control images)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


class CacheConditions:
    """Condition image of cache item i, as condition_tensor; `kind`: one of shapes.CONDITIONS."""

    def __init__(self, cache, kind: str):
        name = str(getattr(cache, "path", "cache"))
        if kind not in shapes.CONDITIONS:
            raise NasError(f"controlnet.condition {kind!r}: allowed {', '.join(shapes.CONDITIONS)}")
        self.records = cache.records()
        if not self.records or not all(k in self.records[0] for k in ("objects", "background", "index")):
            raise NasError(f"{name}: no condition source: its records.jsonl holds no shapes labels (objects, "
                           f"background, index) to draw a {kind} from; ControlNet training needs a shapes cache")  # fmt: skip
        info = shapes_info_file(cache)
        if info is None:
            source = cache.manifest.get("source", {}).get("path")
            raise NasError(f"{name}: no condition source: the shapes dataset's {SHAPES_INFO} (its seed) is not "
                           f"found beside the cache's source {source}")  # fmt: skip
        self.seed = int(json.loads(info.read_text())["seed"])
        self.size = int(cache.manifest["resolution"])
        self.kind, self.name, self.info = kind, name, info
        self._kept: dict[int, torch.Tensor] = {}  # drawn images as uint8, when small (KEEP_PIXELS)
        self._render(0)
        self._render(len(self.records) - 1)  # the first and last: a wrong seed fails here

    def _render(self, i: int) -> torch.Tensor:
        record = self.records[i]
        try:
            image = shapes.condition(int(record["index"]), self.size, self.seed, self.kind, record)
        except ValueError:
            raise NasError(f"{self.name}: records.jsonl line {i + 1}: image {record.get('index')} of the shapes "
                           f"dataset of seed {self.seed} ({self.info}) is not this record; the dataset "
                           "changed since the cache was made") from None  # fmt: skip
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        pixels = self._kept.get(i)
        if pixels is None:
            pixels = self._render(i)
            if self.size * self.size <= KEEP_PIXELS:
                self._kept[i] = pixels
        return pixels.float() / 255.0

    def stack(self, indices) -> torch.Tensor:
        return torch.stack([self[i] for i in indices])


def record_condition(record: dict, seed: int, size: int, kind: str):
    """The condition image (PIL) of a shapes record (a validation scene of `nas eval`)."""
    return shapes.condition(int(record["index"]), size, seed, kind, record)
