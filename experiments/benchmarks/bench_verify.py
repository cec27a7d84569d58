"""Cost of verified caches: `nas precompute --verify`, the cheap check at every open, the hashing
`nas precompute` adds, and sha256 against blake2b.

Two caches: the quickstart's (`--cache`, made by `make demo`; copied to a temporary folder and, if
it predates checksums, given them there) and a synthetic one of `--items` items (default 100,000)
with the same per-item tensors and header records, written in shards of 1024 from the quickstart's
first shard (each shard's `source_index` differs, so no two files are equal). Everything is written
in a temporary folder and deleted at the end.

`--verify` is timed warm (files in the page cache) and cold (each file's pages dropped first with
posix_fadvise(DONTNEED) after an fsync, which a non-root user may do; whether the kernel dropped
them shows in the cold rate).

    python experiments/benchmarks/bench_verify.py --cache results/quickstart/precompute/cache \
        [--items 100000] [--out results/cache_verify]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors import safe_open

from nas.data.cache import LatentCache, _atomic_safetensors, _finish, open_cache, read_manifest
from nas.data.skips import Skips
from nas.data.verify import cache_files, file_record, verify

PLAN_KEYS = ("format", "source", "vae", "text_encoder", "resolution", "latent_channels", "latent_size",
             "text_len", "text_dim", "scaling_factor", "shift_factor", "shard_size", "text_dtype")  # fmt: skip


def hash_rates(megabytes: int = 256) -> dict:
    """MB/s of hashlib's sha256 and blake2b over `megabytes` of random bytes in memory."""
    data = memoryview(os.urandom(megabytes << 20))
    rates = {}
    for name in ("sha256", "blake2b"):
        digest = hashlib.new(name)
        start = time.perf_counter()
        for i in range(0, len(data), 1 << 22):
            digest.update(data[i : i + (1 << 22)])
        rates[name] = round(len(data) / (time.perf_counter() - start) / 1e6)
    return rates


def drop_pages(cache: Path, manifest: dict) -> None:
    for file, _, _ in cache_files(manifest):
        fd = os.open(cache / file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(cache: Path, repeats: int = 3) -> dict:
    """Open with and without the cheap check (best of `repeats`), --verify cold and warm."""
    manifest = read_manifest(cache)
    size = sum((cache / f).stat().st_size for f, _, _ in cache_files(manifest))

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    open_plain = best(lambda: LatentCache(cache, read_manifest(cache)))
    open_checked = best(lambda: open_cache(cache))
    rows = {}
    for kind in ("cold", "warm"):
        if kind == "cold":
            drop_pages(cache, manifest)
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            bad = verify(cache, manifest)
        seconds = time.perf_counter() - start
        assert not bad, bad
        rows[kind] = {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6)}
    return {
        "items": manifest["count"],
        "shards": len(manifest["shards"]),
        "megabytes": round(size / 1e6, 1),
        "open_without_check_s": round(open_plain, 4),
        "open_with_cheap_check_s": round(open_checked, 4),
        "cheap_check_s": round(open_checked - open_plain, 4),
        "verify_cold": rows["cold"],
        "verify_warm": rows["warm"],
    }


def quickstart_copy(source: Path, tmp: Path) -> Path:
    """A copy of the quickstart cache with checksums in its manifest (added if it predates them)."""
    cache = Path(shutil.copytree(source, tmp / "quickstart"))
    manifest = read_manifest(cache)
    if "files" not in manifest:
        for shard in manifest["shards"]:
            shard.update(file_record(cache / shard["file"]))
        manifest["files"] = {f: file_record(cache / f) for f in (manifest["empty_text"], manifest["records"])}
        (cache / "manifest.json").write_text(json.dumps(manifest, sort_keys=True))
    return cache


def synthetic(template: Path, out: Path, items: int) -> tuple[Path, float, float]:
    """A cache of `items` items from the template's first shard; (path, write s, hashing s)."""
    manifest = read_manifest(template)
    plan = {k: manifest[k] for k in PLAN_KEYS}
    plan["shard_size"] = size = 1024
    first = template / manifest["shards"][0]["file"]
    with safe_open(str(first), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no iteration)
        info = {"skips": [], **json.loads(handle.metadata()["nas"])}  # older shards lack "skips"
    assert len(tensors["mean"]) >= size, "the template's first shard must be full"
    (out / "shards").mkdir(parents=True)
    shutil.copy(template / manifest["empty_text"], out / "empty_text.safetensors")
    names, sums, write_s, hash_s = [], {}, 0.0, 0.0
    for k in range(-(-items // size)):
        n = min(size, items - k * size)
        name = f"{k:06d}.safetensors"
        part = {key: value[:n] for key, value in tensors.items()}
        part["source_index"] = torch.arange(k * size, k * size + n)
        records = [{**r, "source_index": k * size + i} for i, r in enumerate(info["records"][:n])]
        meta = {
            "nas": json.dumps({**info, "records": records, "range": [k * size, k * size + n]}, sort_keys=True)
        }
        start = time.perf_counter()
        _atomic_safetensors(out / "shards" / name, part, meta)
        middle = time.perf_counter()
        sums[f"shards/{name}"] = file_record(out / "shards" / name)  # what precompute adds per shard
        write_s, hash_s = write_s + middle - start, hash_s + time.perf_counter() - middle
        names.append(name)
    plan["source"] = {**plan["source"], "entries": items}
    (out / "plan.json").write_text(json.dumps(plan, sort_keys=True))
    _finish(out, plan, names, Skips(), sums)
    return out, write_s, hash_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="results/quickstart/precompute/cache", help="the quickstart cache")
    parser.add_argument("--items", type=int, default=100_000, help="items in the synthetic cache")
    parser.add_argument("--out", default="results/cache_verify", help="folder for cache_verify.json")
    args = parser.parse_args()
    report: dict = {
        "date": date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "hash_mb_per_s": hash_rates(),
    }
    print(f"in-memory hashing, MB/s: {report['hash_mb_per_s']}")
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        quick = quickstart_copy(Path(args.cache), Path(tmp))
        report["quickstart"] = measure(quick)
        print(f"quickstart: {json.dumps(report['quickstart'])}")
        big, write_s, hash_s = synthetic(quick, Path(tmp) / "synthetic", args.items)
        row = measure(big)
        row["precompute_shard_write_s"], row["precompute_hash_s"] = round(write_s, 2), round(hash_s, 2)
        report["synthetic"] = row
        print(f"synthetic: {json.dumps(row)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_verify.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'cache_verify.json'}")


if __name__ == "__main__":
    main()
