"""Checks of a latent cache's files: a cheap one at every open, a full checksum pass on demand.

The manifest records, for each shard and for `empty_text.safetensors` and `records.jsonl`, the size
in bytes and the sha256 of the file (`nas precompute` writes them). Two levels of checking:

- `cheap_problems` (every `open_cache`): each file's size against the manifest, and each
  safetensors header parsed here (8-byte little-endian length, then JSON) with the tensor names,
  dtypes, shapes and data offsets the manifest implies. Reads a few kB per shard, so a truncated or
  header-damaged shard is refused before training starts, never handed to the safetensors library.
- `verify` (`nas precompute --verify CACHE`): the cheap checks plus every checksum, with a progress
  bar. Catches flipped bytes inside the tensor data, which leave the header (and often the values'
  finiteness) intact.

sha256, not a faster non-cryptographic hash: with the CPU's SHA extensions hashlib's sha256 ran at
1783 MB/s against blake2b's 927 MB/s on this machine (results/cache_verify/README.md), faster than
the disk reads it follows, and it needs no extra dependency.

A damaged file is one line naming it and the command that repairs it (`CacheDamaged`, a NasError:
the CLI exits 2). The safetensors format: https://github.com/huggingface/safetensors#format.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from nas.core.errors import NasError

CHUNK = 1 << 22  # bytes read per hashing step (4 MiB)
MAX_HEADER = 100 << 20  # bytes; the safetensors library's own limit on a header
TEXT_CODES = {"float16": "F16", "float32": "F32"}  # manifest text_dtype -> safetensors dtype code


class CacheDamaged(NasError):
    """A cache file that is missing, truncated, or whose header or checksum is wrong."""

    def __init__(self, message: str):
        # A DataLoader worker's exception comes back as CacheDamaged("Caught CacheDamaged in
        # DataLoader worker ... Original Traceback ... nas.data.verify.CacheDamaged: MESSAGE")
        # (torch/_utils.py, ExceptionWrapper.reraise): keep MESSAGE, the one line.
        super().__init__(str(message).rsplit(f"{__name__}.CacheDamaged: ", 1)[-1])


def repair_command(cache: Path) -> str:
    return f"`nas precompute --repair {cache}`"


def damaged(cache: Path, file: str, problem: str) -> CacheDamaged:
    return CacheDamaged(f"{cache / file}: {problem}; repair it with {repair_command(cache)}")


def file_sha256(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """sha256 of a file, read in 4 MiB chunks; `progress(n)` after each chunk (a tqdm bar's update)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:  # readinto one buffer: 25% faster than read()
        while size := handle.readinto(buffer):
            digest.update(view[:size])
            if progress is not None:
                progress(size)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    """What the manifest records of a file: {"bytes", "sha256"}."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def shard_tensors(manifest: dict, count: int) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype code, shape) of a shard holding `count` items."""
    c, s = manifest["latent_channels"], manifest["latent_size"]
    t, d = manifest["text_len"], manifest["text_dim"]
    return {
        "mean": ("F32", [count, c, s, s]),
        "logvar": ("F32", [count, c, s, s]),
        "text": (TEXT_CODES.get(manifest["text_dtype"], "?"), [count, t, d]),
        "text_mask": ("U8", [count, t]),
        "source_index": ("I64", [count]),
    }


def empty_text_tensors(manifest: dict) -> dict[str, tuple[str, list[int]]]:
    t, d = manifest["text_len"], manifest["text_dim"]
    return {"text": ("F32", [t, d]), "text_mask": ("I64", [t])}


def header_problem(path: Path, expect: dict[str, tuple[str, list[int]]] | None) -> str | None:
    """Why `path` is not a whole safetensors file with the tensors `expect` (None: any), or None.

    Parses the header itself (no safetensors call, so no library error can escape) and checks that
    the tensors' data offsets tile the rest of the file exactly, as the format requires."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"truncated ({size} bytes, no safetensors header)"
            length = int.from_bytes(prefix, "little")
            if length > min(MAX_HEADER, size - 8):
                return f"truncated or damaged header (header length {length}, file holds {size} bytes)"
            raw = handle.read(length)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "damaged header (not valid UTF-8 JSON)"
    if not isinstance(header, dict):
        return "damaged header (not a JSON object)"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if expect is not None and set(tensors) != set(expect):
        return f"tensors {sorted(tensors)}, expected {sorted(expect)}"
    spans = []
    for name, info in tensors.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            return f"damaged header (tensor {name!r} lacks dtype, shape or data_offsets)"
        if expect is not None and (dtype, shape) != tuple(expect[name]):
            want_dtype, want_shape = expect[name]
            return f"tensor {name!r} is {dtype} {shape}, expected {want_dtype} {want_shape}"
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position or end < begin:
            return f"damaged header (data offsets {begin}..{end} do not follow {position})"
        position = end
    if position != size - 8 - length:
        return f"truncated or damaged ({size - 8 - length} data bytes, header describes {position})"
    return None


def recorded_files(out: Path) -> dict:
    """file -> {"bytes", "sha256"} as a previous run's manifest recorded them ({} if none)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        records = {s["file"]: s for s in manifest["shards"] if "sha256" in s}
        return {**records, **manifest.get("files", {})}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def needs_rewrite(path: Path, recorded: dict | None, record: dict | None) -> bool:
    """A file to write again: header damaged, or bytes unlike what a previous run recorded."""
    if header_problem(path, None) is not None:
        return True
    if recorded is None:
        return False
    return (record or file_record(path))["sha256"] != recorded["sha256"]


def cache_files(manifest: dict) -> list[tuple[str, dict[str, tuple[str, list[int]]] | None, dict]]:
    """(file, expected tensors or None for a non-safetensors file, manifest record) of every file
    the checks cover: the shards, then empty_text.safetensors and records.jsonl."""
    files: list[tuple[str, dict[str, tuple[str, list[int]]] | None, dict]] = [
        (s["file"], shard_tensors(manifest, s["count"]), s) for s in manifest["shards"]
    ]
    extra = manifest.get("files", {})
    files.append(
        (manifest["empty_text"], empty_text_tensors(manifest), extra.get(manifest["empty_text"], {}))
    )
    files.append((manifest["records"], None, extra.get(manifest["records"], {})))
    return files


def has_checksums(manifest: dict) -> bool:
    return all("sha256" in s for s in manifest["shards"])


def cheap_problem(cache: Path, file: str, expect, record: dict) -> str | None:
    """Size against the manifest and, for safetensors files, the header: why `file` is bad, or None."""
    path = cache / file
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        return f"{size} bytes, the manifest records {record['bytes']} (truncated or overwritten)"
    return header_problem(path, expect) if expect is not None else None


def check_open(cache: Path, manifest: dict) -> None:
    """The cheap checks of every file at open: CacheDamaged (one line) on the first bad one."""
    for file, expect, record in cache_files(manifest):
        problem = cheap_problem(cache, file, expect, record)
        if problem:
            raise damaged(cache, file, problem)
    # A cache made before checksums were recorded opens silently (a note on every command that
    # reads it would be noise); `nas precompute --verify` says it can check only sizes and headers.


def verify(cache: Path, manifest: dict) -> list[tuple[str, str]]:
    """Every file's size, header and checksum, with a progress bar over the bytes; prints one line
    per file (good ones on stdout, bad ones on stderr with the repair command). Returns (file,
    problem) for each bad file."""
    from tqdm import tqdm

    files = cache_files(manifest)
    total = sum((cache / f).stat().st_size for f, _, _ in files if (cache / f).is_file())
    bad: list[tuple[str, str]] = []
    with tqdm(total=total, desc="verify", unit="B", unit_scale=True, file=sys.stderr) as bar:
        for file, expect, record in files:
            problem = cheap_problem(cache, file, expect, record)
            if problem is None and "sha256" in record:
                if file_sha256(cache / file, bar.update) != record["sha256"]:
                    problem = "checksum mismatch (the data bytes changed since the cache was written)"
            elif problem is None:
                bar.update((cache / file).stat().st_size)
            if problem:
                bad.append((file, problem))
                bar.write(str(damaged(cache, file, problem)), file=sys.stderr)
            else:
                checked = "" if "sha256" in record else " (size and header: no checksum recorded)"
                bar.write(f"ok {cache / file}{checked}", file=sys.stdout)
    return bad
