"""`shapes`: a procedurally generated captioned image dataset that needs no download.

Each image shows one or two objects (shape, colour, size, position on a 3x3 grid) on a plain
background; the caption says so in one of several templates. Everything is drawn from
`numpy.random.default_rng([seed, index])`, so image `i` is the same whatever `n` is, and the same
seed gives the same bytes. The split is a hash of the scene's labels (not of the index), so the
train and validation splits never share a scene, let alone an image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from nas.core import limits as L
from nas.core.errors import NasError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # RGB; far apart so a 32-pixel image still tells them apart
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SIZES = {"small": 0.20, "large": 0.32}  # object diameter as a fraction of the image side
# 3x3 grid, row-major; the name is the label, the phrase is what captions say.
POSITIONS = (
    ("top left", "in the top left"),
    ("top", "at the top"),
    ("top right", "in the top right"),
    ("left", "on the left"),
    ("centre", "in the centre"),
    ("right", "on the right"),
    ("bottom left", "in the bottom left"),
    ("bottom", "at the bottom"),
    ("bottom right", "in the bottom right"),
)
POSITION_NAMES = tuple(name for name, _ in POSITIONS)
SPLITS = ("train", "validation")

SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges, so sizes differ by more than a pixel
JITTER = 0.03  # object centre jitter, fraction of the image side
COLOUR_JITTER = 12  # per channel, 0..255: colours vary a little without crossing into a neighbour

# One object is "a {size} {colour} {shape} {where}", "{size} {colour} {shape} {where}" or, fronted,
# "{where}, a {size} {colour} {shape}"; two objects join with "and".
TEMPLATES = (
    "{objects} on a {bg} background",
    "on a {bg} background, {objects}",
    "a picture of {objects}, {bg} background",
    "{objects}; the background is {bg}",
    "an image with {objects} against {bg}",
)
# Templates whose {objects} slot follows a preposition ("of", "with"): only a noun phrase with its
# article reads there ("a picture of a large red triangle in the top left", never "a picture of in
# the top left, ..." or "an image with large red triangle ...").
AFTER_PREPOSITION = frozenset(t for t in TEMPLATES if t.split("{objects}")[0].endswith(("of ", "with ")))


def sample_scene(rng: np.random.Generator, max_objects: int = 2) -> dict:
    """Labels of one image: `objects` (1..max_objects, distinct positions) and `background`."""
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = [
        {
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
            "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
            "size": list(SIZES)[int(rng.integers(len(SIZES)))],
            "position": POSITION_NAMES[int(cell)],
        }
        for cell in sorted(cells)
    ]
    return {"objects": objects, "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]}


def split_of(scene: dict, val_fraction: float) -> str:
    """'validation' for a fixed hash-chosen share of scenes, 'train' for the rest."""
    key = json.dumps({"objects": scene["objects"], "background": scene["background"]}, sort_keys=True)
    unit = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return "validation" if unit < val_fraction else "train"


PHRASE_FORMS = ("article", "fronted", "bare")  # the three ways one object is named (above)


def object_phrase(obj: dict, form: str) -> str:
    """One object named in one of PHRASE_FORMS."""
    where = dict(POSITIONS)[obj["position"]]
    words = f"{obj['size']} {obj['colour']} {obj['shape']}"
    return {"article": f"a {words} {where}", "fronted": f"{where}, a {words}", "bare": f"{words} {where}"}[
        form
    ]


def fill(template: str, scene: dict, forms: list[str]) -> str:
    """`template` with the scene's objects named in `forms` (one per object); after a preposition
    every object takes the article form, whatever was drawn."""
    if template in AFTER_PREPOSITION:
        forms = ["article"] * len(forms)
    phrases = [object_phrase(obj, form) for obj, form in zip(scene["objects"], forms)]
    return template.format(objects=" and ".join(phrases), bg=scene["background"])


def caption(scene: dict, rng: np.random.Generator) -> str:
    """One of TEMPLATES filled from the labels; article and word order vary. The draws (one or two
    per object, then the template) are the same whatever the template, so the image drawn after
    the caption from the same generator does not depend on the wording."""
    forms = []
    for _obj in scene["objects"]:
        if rng.random() < 0.5:
            forms.append("article")
        else:
            forms.append("fronted" if rng.random() < 0.5 else "bare")
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return fill(template, scene, forms)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85  # same visual weight as a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        a = r * 0.38  # half the arm thickness
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(shape)


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, ...]:
    noise = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(c) for c in np.clip(np.array(rgb) + noise, 0, 255))


def render(scene: dict, size: int, rng: np.random.Generator, kind: str = "image") -> Image.Image:
    """Draw the scene as a `size` x `size` RGB image; kind `mask` or `edges` (CONDITIONS) draws its
    objects white on black, filled or outlined, from the same random draws (same jitter)."""
    big = size * SUPERSAMPLE
    background = _jittered(BACKGROUNDS[scene["background"]], rng)
    image = Image.new("RGB", (big, big), background if kind == "image" else (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        row, col = divmod(POSITION_NAMES.index(obj["position"]), 3)
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        cx, cy = ((col + 0.5) / 3 + dx) * big, ((row + 0.5) / 3 + dy) * big
        r = SIZES[obj["size"]] * big / 2
        fill = _jittered(COLOURS[obj["colour"]], rng)
        paint: dict[str, Any] = {"fill": fill}
        if kind == "mask":
            paint = {"fill": (255, 255, 255)}
        elif kind == "edges":  # one output pixel wide
            paint = {"outline": (255, 255, 255), "width": SUPERSAMPLE}
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], **paint)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r), **paint)
    return image.resize((size, size), Image.Resampling.BOX)


# Condition images a ControlNet can be trained on (nas/train/controlnet.py): the objects' silhouettes
# or their outlines, white on black, re-drawn from (dataset seed, index) exactly where the image has them.
CONDITIONS = ("mask", "edges")


def condition(index: int, size: int, seed: int, kind: str, record: dict | None = None) -> Image.Image:
    """The `kind` condition image (CONDITIONS) of image `index` of the dataset `seed`, `size` pixels.
    With `record` (a row of metadata.jsonl or a cache's records.jsonl), the re-drawn scene and caption
    must be the record's: ValueError otherwise (another seed, or not a shapes record)."""
    if kind not in CONDITIONS:
        raise ValueError(f"condition kind {kind!r} (allowed: {', '.join(CONDITIONS)})")
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    text = caption(scene, rng)
    if record is not None and (
        text != record.get("text")
        or scene["objects"] != record.get("objects")
        or scene["background"] != record.get("background")
    ):
        raise ValueError(f"image {index} of the shapes dataset of seed {seed} is not this record")
    return render(scene, size, rng, kind)


def sample(index: int, size: int = 32, seed: int = 0, val_fraction: float = 0.1) -> tuple[Image.Image, dict]:
    """Image and record (labels, caption, split) number `index` of the dataset named by `seed`."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    text = caption(scene, rng)
    image = render(scene, size, rng)
    record = {
        "file_name": f"{index:06d}.png",
        "text": text,
        **scene,
        "split": split_of(scene, val_fraction),
        "index": index,
    }
    return image, record


def generate(
    n: int,
    size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.1,
    split: str | None = None,
) -> Iterator[tuple[Image.Image, dict]]:
    """`n` samples in index order; with `split`, the first `n` of that split (the others skipped)."""
    index = produced = 0
    while produced < n:
        image, record = sample(index, size, seed, val_fraction)
        index += 1
        if split is None or record["split"] == split:
            produced += 1
            yield image, record


def check_args(n: int, size: int, val_fraction: float, seed: int = 0) -> None:
    """One-line NasError for an argument out of its range (bounds: nas/core/limits.py)."""
    if not 1 <= n <= L.MAX_DATA_ITEMS:
        raise NasError(f"--n: must be in 1..{L.MAX_DATA_ITEMS} (got {n})")
    if not 8 <= size <= L.MAX_IMAGE_SIZE:
        raise NasError(f"--size: must be between 8 and {L.MAX_IMAGE_SIZE} pixels (got {size})")
    if not 0 <= seed <= L.MAX_SEED:  # numpy's generators take no negative seed
        raise NasError(f"--seed: must be in 0..{L.MAX_SEED} (got {seed})")
    if not 0.0 <= val_fraction < 1.0:
        raise NasError(f"--val-fraction: must be in [0, 1) (got {val_fraction})")


def write(out: str | Path, n: int, size: int = 32, seed: int = 0, val_fraction: float = 0.1) -> dict:
    """Write `n` samples as OUT/<split>/{NNNNNN.png, metadata.jsonl}; return counts per split.

    The layout is diffusers' image folder with one folder per split, so the default dataset goes
    through the same reader as user data. Refuses a folder that already holds a dataset.
    """
    check_args(n, size, val_fraction, seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NasError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise NasError(f"{out}: folder is not empty; choose a new --out (nothing was written)")
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)
    for image, record in tqdm(generate(n, size, seed, val_fraction), total=n, desc="shapes", unit="img"):
        image.save(out / record["split"] / record["file_name"], format="PNG")
        rows[record["split"]].append(json.dumps(record, sort_keys=True))
    for s in SPLITS:
        (out / s / "metadata.jsonl").write_text("".join(row + "\n" for row in rows[s]))
    info: dict[str, Any] = {"n": n, "size": size, "seed": seed, "val_fraction": val_fraction}
    info["splits"] = {s: len(rows[s]) for s in SPLITS}
    (out / "shapes.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
