"""Skipped samples, each named: the file, the metadata.jsonl line (or the tar shard and member), why.

The readers (nas/data/folders.py) record a `Skip` for every sample they leave out, while listing
(metadata.jsonl lines, tar members) or while decoding (missing or corrupt images). The latent cache
writes them to CACHE/skipped.jsonl, `nas vae train` into vae_train.json, and both commands print
`Skips.summary()`: the count of each reason and the first few items of each.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

# Every reason a sample is skipped, in the order a sample is checked. Listing: the first six (image
# folder) and "no image" / "truncated shard" (tar shards); decoding: the last three.
REASONS = {
    "no file_name": "a metadata.jsonl line whose file_name is absent, empty or not a string",
    "no caption": "no caption key on the line (no KEY.txt or caption in KEY.json in a shard)",
    "caption not a string": "the caption is a JSON number, array, object, boolean or null",
    "empty caption": "the caption is empty or only whitespace",
    "duplicate": "a file_name listed again (the first usable line is kept), or a second image for a tar key",
    "no image": "a tar sample with a caption but no image member",
    "truncated shard": "a tar shard cut short; the samples before the damage are kept",
    "missing file": "file_name names no file (or the member is gone from the shard)",
    "unreadable file": "the file exists but cannot be read (permissions, a folder, a damaged shard)",
    "corrupt image": "the bytes are not an image PIL can decode, or the image is cut short",
}
NAMED_PER_REASON = 3  # items named in the summary line per reason; skipped.jsonl has them all
DETAIL_CHARS = 80  # a detail longer than this is cut in the summary line (kept whole in the files)


@dataclass(frozen=True)
class Skip:
    """One skipped sample. Image folder: `file` is its file_name and `line` its metadata.jsonl line;
    tar shards: `file` is the shard's file name and `member` the member; `detail` says more."""

    reason: str
    file: str | None = None
    line: int | None = None
    member: str | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}; known: {', '.join(REASONS)}")

    def row(self) -> dict:
        """The skipped.jsonl object: file, line, member (null outside tar shards), reason, detail."""
        return asdict(self)

    def name(self, detail_chars: int | None = None) -> str:
        """'img/3.png line 4', 'line 7' (no file_name), '00001.tar:000005.jpg', then ': detail'."""
        if self.member is not None:
            where = f"{self.file}:{self.member}"
        elif self.line is not None:
            where = f"{self.file} line {self.line}" if self.file else f"line {self.line}"
        else:
            where = self.file or "?"
        detail = self.detail
        if detail_chars is not None and len(detail) > detail_chars:
            detail = detail[: detail_chars - 3] + "..."
        return f"{where}: {detail}" if detail else where


class Skips(list[Skip]):
    """The skipped samples of one source (or one cache), in source order."""

    def counts(self) -> dict[str, int]:
        """reason -> count, sorted by reason (as the manifest stores `skipped_reasons`)."""
        return dict(sorted(Counter(s.reason for s in self).items()))

    def summary(self, per_reason: int = NAMED_PER_REASON) -> str:
        """'skipped 3: 2 missing file (a.png line 4, b.png line 9); 1 corrupt image (c.png line 5: ...)'.

        Reasons in order of their first item; each names its first `per_reason` items.
        """
        if not self:
            return "skipped 0"
        groups: dict[str, list[Skip]] = {}
        for skip in self:
            groups.setdefault(skip.reason, []).append(skip)
        parts = []
        for reason, items in groups.items():
            names = [s.name(DETAIL_CHARS) for s in items[:per_reason]]
            if len(items) > per_reason:
                names.append(f"and {len(items) - per_reason} more")
            parts.append(f"{len(items)} {reason} ({', '.join(names)})")
        return f"skipped {len(self)}: " + "; ".join(parts)

    def in_order(self) -> Skips:
        """Listing and decoding skips merged: by metadata.jsonl line, or by shard and member."""
        return Skips(sorted(self, key=lambda s: (s.line or 0, s.file or "", s.member or "")))

    def jsonl(self) -> str:
        return "".join(json.dumps(s.row(), sort_keys=True) + "\n" for s in self)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Skips:
        return cls(Skip(**row) for row in rows)

    @classmethod
    def read(cls, path: str | Path) -> Skips:
        """A skipped.jsonl file as written by `jsonl()`."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls.from_rows([json.loads(line) for line in lines if line.strip()])


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type: null, boolean, number, string, array, object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def caption_problem(value: object, present: bool = True) -> tuple[str, str] | None:
    """(reason, detail) when `value` cannot be a caption, else None; `present`: the key was there."""
    if not present:
        return "no caption", ""
    if not isinstance(value, str):
        return "caption not a string", json_type(value)
    if not value.strip():
        return "empty caption", ""
    return None


def image_error_detail(exc: BaseException) -> str:
    """PIL's message, first line, without the memory address of the in-memory file it was given
    (kept out so a resumed cache's shard headers stay byte-identical)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)
