"""Readers for captioned image data: an image folder with `metadata.jsonl`, or WebDataset tar shards.

Image folder: diffusers' text-to-image layout, `DIR/metadata.jsonl` with one JSON object a line,
`file_name` (relative to DIR) and `text`; other keys are kept as labels. Tar shards: what img2dataset
writes for LAION subsets, members `KEY.jpg|png|webp` + `KEY.txt` (+ optional `KEY.json`).

Listing reads only names and captions; images are decoded when asked for. A bad sample (no caption,
a caption that is not a string, a duplicate file_name, a missing or corrupt image, ...) is skipped,
never fatal, and recorded as a `Skip` naming its file and metadata.jsonl line (or shard and member)
and the reason (nas/data/skips.py). A metadata.jsonl line that is not a JSON object, and a source with
no usable sample at all, are errors.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nas.core.errors import NasError
from nas.data.skips import Skip, Skips, caption_problem, image_error_detail, json_type

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA = "metadata.jsonl"


class UnreadableImage(Exception):
    """An image that is missing, unreadable or corrupt (the sample is skipped).

    `reason` is one of nas.data.skips.REASONS ("missing file", "unreadable file", "corrupt image").
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Entry:
    key: str  # file_name (image folder) or "SHARD/KEY" (tar), unique within the source
    text: str
    record: dict  # every metadata key of the sample, labels included
    locator: tuple  # ("file", Path) or ("tar", shard Path, member name)
    line: int | None = None  # its metadata.jsonl line (image folder)

    def skip(self, exc: UnreadableImage) -> Skip:
        """The record of this entry skipped at decoding, named as the listing names its skips."""
        if self.locator[0] == "tar":
            return Skip(exc.reason, Path(self.locator[1]).name, member=self.locator[2], detail=exc.detail)
        return Skip(exc.reason, self.key, self.line, detail=exc.detail)


@dataclass
class Source:
    """A listed dataset: usable entries in a fixed order, plus what was skipped while listing."""

    path: Path
    kind: str  # "imagefolder" | "webdataset"
    entries: list[Entry]
    skips: Skips = field(default_factory=Skips)  # skipped while listing, in source order
    _tars: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def fingerprint(self) -> dict:
        """Identity of the listing: a cache built from another listing is refused."""
        digest = hashlib.sha256()
        for e in self.entries:
            digest.update(f"{e.key}\t{e.text}\n".encode())
        return {
            "path": str(self.path),
            "kind": self.kind,
            "entries": len(self.entries),
            "listing_sha256": digest.hexdigest(),
            "skipped_at_listing": self.skips.counts(),
        }

    def read_bytes(self, entry: Entry) -> bytes:
        try:
            if entry.locator[0] == "file":
                return Path(entry.locator[1]).read_bytes()
            shard, member = entry.locator[1], entry.locator[2]
            if shard not in self._tars:
                self._tars[shard] = tarfile.open(shard)  # noqa: SIM115 (kept open: members are read in order)
            handle = self._tars[shard].extractfile(member)
            if handle is None:
                raise UnreadableImage("unreadable file", "not a regular file in the shard")
            return handle.read()
        except FileNotFoundError:
            raise UnreadableImage("missing file") from None
        except KeyError:
            raise UnreadableImage("missing file", "no such member in the shard") from None
        except (OSError, tarfile.TarError) as exc:
            raise UnreadableImage("unreadable file", getattr(exc, "strerror", None) or str(exc)) from None

    def load(self, entry: Entry, resolution: int) -> Image.Image:
        """The entry's image, RGB, resized and centre-cropped to `resolution`; UnreadableImage if not."""
        return decode(self.read_bytes(entry), resolution)

    def close(self) -> None:
        for handle in self._tars.values():
            handle.close()
        self._tars.clear()


def decode(data: bytes, resolution: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # truncated files fail here, not later
            return resize_center_crop(image, resolution)
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,  # PIL's PNG reader raises it for broken chunks
        EOFError,
        Image.DecompressionBombError,
    ) as exc:
        raise UnreadableImage("corrupt image", image_error_detail(exc)) from None


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution`, then the central square: diffusers' train_text_to_image recipe."""
    if image.mode != "RGB":
        # Composite transparency on white instead of letting it turn black.
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> FloatTensor[3, H, W] in [-1, 1], the range diffusers' VAEs take."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def open_source(path: str | Path, caption_key: str = "text") -> Source:
    """List a folder with metadata.jsonl, a folder of .tar shards, one .tar, or a shard pattern."""
    text = str(path)
    if any(ch in text for ch in "*?[{"):
        shards = expand_shards(text)
        if not shards:
            raise NasError(f"{text}: no tar shard matches this pattern")
        return _list_tars(shards, Path(text), caption_key)
    path = Path(path)
    if not path.exists():
        raise NasError(f"{path}: no such file or folder (expected a folder with {METADATA} or tar shards)")
    if path.is_file():
        if path.suffix != ".tar":
            raise NasError(f"{path}: not a folder or a .tar shard")
        return _list_tars([path], path, caption_key)
    if (path / METADATA).is_file():
        return _list_folder(path, caption_key)
    shards = sorted(path.glob("*.tar"))
    if shards:
        return _list_tars(shards, path, caption_key)
    splits = sorted(p.name for p in path.iterdir() if (p / METADATA).is_file())
    if splits:
        raise NasError(
            f"{path}: no {METADATA} here, but split folders {', '.join(splits)} have one: "
            f"pass {path / splits[-1]}"
        )
    raise NasError(f"{path}: no {METADATA} and no .tar shards in this folder")


def expand_shards(pattern: str) -> list[Path]:
    """Brace ranges as img2dataset prints them ('{00000..00009}.tar'), then shell globs."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        names = [
            pattern[: match.start()] + str(i).zfill(len(lo)) + pattern[match.end() :]
            for i in range(int(lo), int(hi) + 1)
        ]
        return [p for name in names for p in expand_shards(name)]
    return [Path(p) for p in sorted(glob.glob(pattern))]


def _list_folder(root: Path, caption_key: str) -> Source:
    meta = root / METADATA
    source = Source(root, "imagefolder", [])
    seen_caption_key = False
    first_keys: list[str] = []
    kept_at: dict[str, int] = {}  # normalised file_name -> line of its kept entry
    for lineno, row in _metadata_rows(meta):
        first_keys = first_keys or sorted(row)
        seen_caption_key = seen_caption_key or caption_key in row
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            what = (
                "absent" if "file_name" not in row else "empty" if isinstance(name, str) else json_type(name)
            )
            source.skips.append(Skip("no file_name", None, lineno, detail=f"file_name is {what}"))
            continue
        problem = caption_problem(row.get(caption_key), caption_key in row)
        if problem:
            reason, detail = problem
            if reason == "no caption":
                detail = f"no '{caption_key}' key"
            source.skips.append(Skip(reason, name, lineno, detail=detail))
            continue
        normal = posixpath.normpath(name)  # "./a.png" and "a.png" are one file
        if normal in kept_at:
            source.skips.append(Skip("duplicate", name, lineno, detail=f"also on line {kept_at[normal]}"))
            continue
        kept_at[normal] = lineno
        caption = row[caption_key].strip()
        source.entries.append(Entry(name, caption, row, ("file", root / name), lineno))
    if not seen_caption_key and first_keys:
        raise NasError(
            f"{meta}: no line has a '{caption_key}' key (line 1 has: {', '.join(first_keys)}); "
            "each line needs file_name and text"
        )
    if not source.entries:
        detail = source.skips.summary() if source.skips else "file is empty"
        raise NasError(f"{meta}: no usable sample ({detail})")
    return source


def _metadata_rows(meta: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is fatal."""
    try:
        with meta.open("rb") as handle:
            for lineno, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM is allowed
                except UnicodeDecodeError as exc:
                    raise NasError(
                        f"{meta}: line {lineno}: not UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                        "save the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    hint = ""
                    if exc.msg.startswith("Invalid control character"):
                        hint = "; a tab or line break inside a string must be written as \\t or \\n"
                    raise NasError(
                        f"{meta}: line {lineno}: not valid JSON (json.loads of this line: {exc}){hint}"
                    ) from None
                if not isinstance(row, dict):
                    raise NasError(
                        f"{meta}: line {lineno}: expected a JSON object with file_name and text, "
                        f"got {json_type(row)}"
                    )
                yield lineno, row
    except OSError as exc:
        raise NasError(f"{meta}: cannot read ({exc.strerror or exc})") from None


def _list_tars(shards: list[Path], path: Path, caption_key: str) -> Source:
    source = Source(path, "webdataset", [])
    for shard in shards:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")  # WebDataset: key is up to the first dot
                    key = f"{folder}/{stem}" if folder else stem
                    sample = samples.setdefault(key, {"first": member.name})
                    ext = "." + ext.lower() if dot else ""
                    if ext in IMAGE_EXTENSIONS and "image" in sample:
                        detail = f"a second image for {key}; {sample['image']} is kept"
                        source.skips.append(Skip("duplicate", shard.name, member=member.name, detail=detail))
                    elif ext in IMAGE_EXTENSIONS:
                        sample["image"] = member.name
                    elif ext in (".txt", ".json"):
                        handle = tar.extractfile(member)
                        sample[ext] = handle.read().decode("utf-8", errors="replace") if handle else ""
        except tarfile.ReadError as exc:
            if not samples:
                raise NasError(f"{shard}: not a readable tar file ({exc})") from None
            # Keep the samples listed before the damage.
            detail = f"{exc}; {len(samples)} keys before the damage listed"
            source.skips.append(Skip("truncated shard", shard.name, detail=detail))
        except OSError as exc:
            raise NasError(f"{shard}: cannot read ({exc})") from None
        for key, sample in samples.items():
            record = {}
            if ".json" in sample:
                try:
                    parsed = json.loads(sample[".json"])
                    record = parsed if isinstance(parsed, dict) else {}
                except json.JSONDecodeError:
                    record = {}
            caption = sample.get(".txt", record.get(caption_key))
            if "image" not in sample:
                source.skips.append(Skip("no image", shard.name, member=sample["first"]))
                continue
            problem = caption_problem(caption, ".txt" in sample or caption_key in record)
            if problem:
                reason, detail = problem
                if reason == "no caption":
                    detail = f"no {key}.txt and no '{caption_key}' in {key}.json"
                source.skips.append(Skip(reason, shard.name, member=sample["image"], detail=detail))
                continue
            text = str(caption).strip()  # a non-empty string: caption_problem checked it
            record = {**record, "file_name": sample["image"], "text": text}
            entry_key = f"{shard.name}/{key}"
            source.entries.append(Entry(entry_key, text, record, ("tar", shard, sample["image"])))
    if not source.entries:
        detail = source.skips.summary() if source.skips else "shards are empty"
        raise NasError(f"{path}: no usable sample in {len(shards)} tar shard(s) ({detail})")
    return source


def load_images(
    source: Source, resolution: int, limit: int | None = None
) -> tuple[torch.Tensor, list[int], Skips]:
    """Decode entries into one FloatTensor[N, 3, R, R] in [-1, 1], skipping unreadable images.

    For small datasets (VAE and evaluator training on `shapes`); the cache streams instead.
    Returns the tensor, the entry indices it holds, and the skipped samples (listing + decoding).
    """
    from tqdm import tqdm

    skips = Skips(source.skips)
    images, kept = [], []
    count = len(source) if limit is None else min(limit, len(source))
    for i in tqdm(range(count), desc="load images", unit="img", leave=False):
        try:
            images.append(to_tensor(source.load(source.entries[i], resolution)))
            kept.append(i)
        except UnreadableImage as exc:
            skips.append(source.entries[i].skip(exc))
    source.close()
    skips = skips.in_order()
    if not images:
        raise NasError(f"{source.path}: no readable image among {count} samples ({skips.summary()})")
    return torch.stack(images), kept, skips
