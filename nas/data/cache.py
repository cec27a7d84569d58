"""Precomputed latent cache: every image encoded once to the VAE posterior, every caption once.

Layout of CACHE/:
    plan.json             what the cache is (source listing, encoder hashes, resolution, ...);
                          written first, so a rerun with other settings is refused, not mixed in
    empty_text.safetensors  the encoded empty caption (classifier-free guidance)
    shards/NNNNNN.safetensors  source entries [N*shard_size, (N+1)*shard_size): posterior `mean`
                          and `logvar` (float32), caption `text` (float16 by default) and
                          `text_mask`; records and skipped items in the header metadata
    records.jsonl         one metadata row per cached item (caption + labels), in item order
    skipped.jsonl         one row per skipped source sample (file, line, member, reason, detail):
                          the listing's skips and every shard's, rebuilt at the end of each run
    manifest.json         written last: its presence means the cache is complete; records each
                          shard's (and empty_text's, records.jsonl's) size and sha256

Every file is written to a temporary name and renamed into place, so a killed run leaves only whole
files; rerunning the same command skips the shards that exist and ends with the same bytes.
A shard that fails its checks (nas/data/verify.py: size, header, the checksum a previous run
recorded) is recomputed by that rerun; `open_cache` refuses a cache whose files fail the cheap ones.
Both posterior moments are kept (not one sample), so each read draws a fresh latent.
"""

from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from nas.core.errors import NasError
from nas.core.runfolder import atomic_path, write_bytes, write_json
from nas.data.folders import Source, UnreadableImage, to_tensor
from nas.data.skips import Skips
from nas.data.verify import check_open, damaged, file_record, needs_rewrite, recorded_files

FORMAT = "nas-latent-cache/1"
SHARD_SIZE = 1024  # source entries per shard: ~1 MB of latents at 8x8x4, ~130 MB at SD's 64x64x4
IN_MEMORY_BYTES = 1 << 30  # caches up to 1 GiB are read into RAM on first use (~20 us/item vs ~200 mmap)
TEXT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SKIPPED = "skipped.jsonl"


def _atomic_json(path: Path, data: object) -> None:
    write_json(path, data, sort_keys=True, fsync=True)


def _atomic_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    with atomic_path(path, fsync=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600; a shared cache should be readable


def _mismatch(plan: dict, old: dict) -> str | None:
    """The first setting in which an existing cache differs from what the command asks for."""
    checks = [
        ("source", lambda p: (p["source"]["kind"], p["source"]["listing_sha256"])),
        ("vae", lambda p: p["vae"]["sha256"]),
        ("text_encoder", lambda p: p["text_encoder"]["sha256"]),
    ] + [
        (k, lambda p, k=k: p[k])
        for k in (
            "format",
            "resolution",
            "text_len",
            "scaling_factor",
            "shift_factor",
            "shard_size",
            "text_dtype",
        )
    ]
    for name, key in checks:
        try:
            if key(plan) != key(old):
                return f"{name}: cache has {_short(old[name])}, command asks for {_short(plan[name])}"
        except (KeyError, TypeError):
            return f"{name}: missing in the cache's plan.json"
    return None


def _short(value: object) -> str:
    if isinstance(value, dict):
        parts = [
            f"{k}={str(v)[:12] if k.endswith('sha256') else v}" for k, v in value.items() if k != "entries"
        ]
        return "(" + ", ".join(parts) + ")"
    return repr(value)


def precompute(
    source: Source,
    vae,
    vae_identity: dict,
    text_encoder,
    out: str | Path,
    resolution: int,
    batch_size: int = 64,
    shard_size: int = SHARD_SIZE,
    text_dtype: str = "float16",
    caption_key: str = "text",
) -> dict:
    """Encode `source` into the cache folder `out` (resuming a killed run); return the manifest."""
    out = Path(out)
    levels = len(vae.config.block_out_channels) - 1
    if resolution < 1 or resolution % (2**levels):
        raise NasError(f"--resolution {resolution}: must be a positive multiple of {2**levels} for this VAE")
    if text_dtype not in TEXT_DTYPES:
        raise NasError(f"text_dtype {text_dtype!r}: allowed {', '.join(TEXT_DTYPES)}")
    latent_size = resolution // 2**levels
    plan = {
        "format": FORMAT,
        "source": source.fingerprint(),
        "vae": vae_identity,
        "text_encoder": text_encoder.identity,
        "resolution": resolution,
        "latent_channels": int(vae.config.latent_channels),
        "latent_size": latent_size,
        "text_len": text_encoder.max_length,
        "text_dim": text_encoder.hidden_size,
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        "shard_size": shard_size,
        "text_dtype": text_dtype,
        # how it was encoded, so that `--repair` recomputes a shard the same way (not compared)
        "encode": {
            "batch_size": batch_size,
            "device": next(vae.parameters()).device.type,
            "caption_key": caption_key,
        },
    }
    plan = _prepare_folder(out, plan)
    plan_sha = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    shards = out / "shards"
    shards.mkdir(exist_ok=True)
    for stale in [*out.glob("*.tmp"), *shards.glob("*.tmp")]:
        stale.unlink()  # half-written by a killed run; the renamed files are whole

    empty = out / "empty_text.safetensors"
    old = recorded_files(out)
    if empty.is_file() and needs_rewrite(empty, old.get("empty_text.safetensors"), None):
        empty.unlink()  # damaged since it was written: encode it again
    if not empty.is_file():
        hidden, mask = text_encoder.encode([""])
        _atomic_safetensors(empty, {"text": hidden[0].float().cpu(), "text_mask": mask[0].cpu()})

    n_shards = -(-len(source) // shard_size)
    names = [f"{k:06d}.safetensors" for k in range(n_shards)]
    sums = {k: file_record(shards / name) for k, name in enumerate(names) if (shards / name).is_file()}
    done = {
        k
        for k, record in sums.items()
        if not needs_rewrite(shards / names[k], old.get(f"shards/{names[k]}"), record)
        and _names_its_skips(shards / names[k])
    }
    done_items = sum(min(shard_size, len(source) - k * shard_size) for k in done)
    bar = tqdm(total=len(source), initial=done_items, desc="precompute", unit="img", smoothing=0.1)
    for k in range(n_shards):
        if k not in done:
            start, stop = k * shard_size, min((k + 1) * shard_size, len(source))
            dtype = TEXT_DTYPES[text_dtype]
            tensors, info = _encode_range(
                source, vae, text_encoder, start, stop, resolution, batch_size, dtype, bar
            )
            # One metadata key: safetensors writes several in random order, and resumed shards must
            # be byte-identical to uninterrupted ones.
            meta = {"nas": json.dumps({**info, "plan_sha256": plan_sha}, sort_keys=True)}
            _atomic_safetensors(shards / names[k], tensors, meta)
            sums[k] = file_record(shards / names[k])
    bar.close()
    source.close()
    return _finish(out, plan, names, source.skips, {f"shards/{names[k]}": sums[k] for k in sums})


def _names_its_skips(shard: Path) -> bool:
    """A whole shard of this format: shards written before skips were named (counts only) are redone."""
    with safe_open(str(shard), framework="pt") as handle:
        return "skips" in json.loads((handle.metadata() or {}).get("nas", "{}"))


def check_out_folder(out: str | Path) -> None:
    """Before any work: `out` must be new, empty, or a cache folder (complete or interrupted)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NasError(f"{out}: exists and is not a folder")
    if out.is_dir() and not (out / "plan.json").is_file() and any(out.iterdir()):
        raise NasError(f"{out}: folder is not empty and is not a nas latent cache; choose a new --out")


def _prepare_folder(out: Path, plan: dict) -> dict:
    """Create `out` or check that it holds this same cache (complete or interrupted)."""
    check_out_folder(out)
    plan_file = out / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        problem = _mismatch(plan, old)
        if problem:
            raise NasError(f"{out}: refusing to mix caches: {problem}; use another --out or delete {out}")
        return old  # keeps the original paths if the data or models moved but are the same
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(plan_file, plan)
    return plan


@torch.no_grad()
def _encode_range(source, vae, text_encoder, start, stop, resolution, batch_size, text_dtype, bar):
    device = next(vae.parameters()).device
    means, logvars, texts, masks, indices, records = [], [], [], [], [], []
    skips: list[dict] = []  # skipped.jsonl rows of this range's unreadable images
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        images = torch.stack([img for _, img in pending]).to(device)
        posterior = vae.encode(images).latent_dist
        hidden, mask = text_encoder.encode([source.entries[i].text for i, _ in pending])
        means.append(posterior.mean.float().cpu())
        logvars.append(posterior.logvar.float().cpu())
        texts.append(hidden.to(text_dtype).cpu())
        masks.append(mask.to(torch.uint8).cpu())
        for i, _ in pending:
            indices.append(i)
            records.append({**source.entries[i].record, "text": source.entries[i].text, "source_index": i})
        bar.update(len(pending))
        pending.clear()

    for i in range(start, stop):
        try:
            pending.append((i, to_tensor(source.load(source.entries[i], resolution))))
        except UnreadableImage as exc:
            skips.append(source.entries[i].skip(exc).row())
            bar.update(1)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    if not means:  # every image of the range unreadable: an empty but valid shard
        c, s = int(vae.config.latent_channels), resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        means, logvars = [torch.zeros(0, c, s, s)], [torch.zeros(0, c, s, s)]
        texts = [torch.zeros(0, text_encoder.max_length, text_encoder.hidden_size, dtype=text_dtype)]
        masks = [torch.zeros(0, text_encoder.max_length, dtype=torch.uint8)]
    tensors = {
        "mean": torch.cat(means),
        "logvar": torch.cat(logvars),
        "text": torch.cat(texts),
        "text_mask": torch.cat(masks),
        "source_index": torch.tensor(indices, dtype=torch.int64),
    }
    return tensors, {"records": records, "skips": skips, "range": [start, stop]}


def _finish(out: Path, plan: dict, names: list[str], listing: Skips, sums: dict[str, dict]) -> dict:
    """Gather shard headers into records.jsonl, skipped.jsonl and manifest.json (the completion marker).

    skipped.jsonl is rebuilt from the listing and the shard headers on every run, so a resumed run
    writes each skipped item once and the manifest's counts are always those of the file.
    """
    skips = Skips(listing)
    rows, shard_info = [], []
    for name in names:
        with safe_open(str(out / "shards" / name), framework="pt") as handle:
            info = json.loads(handle.metadata()["nas"])
            count = handle.get_slice("mean").get_shape()[0]
        skips.extend(Skips.from_rows(info["skips"]))
        rows.extend(info["records"])
        shard_info.append({"file": f"shards/{name}", "count": count, **sums[f"shards/{name}"]})
    skips = skips.in_order()
    write_bytes(out / SKIPPED, skips.jsonl().encode(), fsync=True)
    if not rows:
        raise NasError(
            f"{plan['source']['path']}: no usable sample ({skips.summary()}; all in {out / SKIPPED})"
        )
    records_text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    write_bytes(out / "records.jsonl", records_text.encode(), fsync=True)
    manifest = {
        **plan,
        "count": len(rows),
        "skipped": len(skips),
        "skipped_reasons": skips.counts(),
        "skipped_items": SKIPPED,
        "shards": shard_info,
        "records": "records.jsonl",
        "empty_text": "empty_text.safetensors",
        "files": {name: file_record(out / name) for name in ("empty_text.safetensors", "records.jsonl")},
    }
    _atomic_json(out / "manifest.json", manifest)
    return manifest


class LatentCache:
    """A complete cache, opened for reading. Shards are memory-mapped and read item by item."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._starts = []
        total = 0
        for shard in manifest["shards"]:
            self._starts.append(total)
            total += shard["count"]
        self._count = total
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        size = sum((path / s["file"]).stat().st_size for s in manifest["shards"])
        self.in_memory = size <= IN_MEMORY_BYTES
        self._records: list[dict] | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        m = self.manifest
        return (m["latent_channels"], m["latent_size"], m["latent_size"])

    def _handle(self, k: int):
        if os.getpid() != self._pid:  # a DataLoader worker: open its own memory maps
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            shard = self.manifest["shards"][k]
            file = self.path / shard["file"]
            if not self.in_memory:
                self._handles[k] = safe_open(str(file), framework="pt")
                return self._handles[k]
            data = file.read_bytes()  # read whole anyway; sha256 adds ~1 ms per MB (cache_verify)
            if "sha256" in shard and hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise damaged(self.path, shard["file"], "checksum mismatch (bytes changed since written)")
            self._handles[k] = load(data)
        return self._handles[k]

    def moments(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, logvar, text, text_mask) of item `index`, as stored (text possibly float16)."""
        if not 0 <= index < self._count:
            raise IndexError(f"item {index} out of range for a cache of {self._count}")
        k = bisect_right(self._starts, index) - 1
        j = index - self._starts[k]
        h = self._handle(k)
        names = ("mean", "logvar", "text", "text_mask")
        if self.in_memory:
            return tuple(h[name][j] for name in names)
        return tuple(h.get_slice(name)[j : j + 1][0] for name in names)

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded empty caption: (FloatTensor[T, D], LongTensor[T])."""
        with safe_open(str(self.path / self.manifest["empty_text"]), framework="pt") as handle:
            return handle.get_tensor("text").float(), handle.get_tensor("text_mask").long()

    def records(self) -> list[dict]:
        """Metadata row of every item (caption `text` and, for shapes, the generator's labels)."""
        if self._records is None:
            lines = (self.path / self.manifest["records"]).read_text(encoding="utf-8").splitlines()
            self._records = [json.loads(line) for line in lines]
        return self._records

    def captions(self) -> list[str]:
        return [r["text"] for r in self.records()]

    def skips(self) -> Skips:
        """Every source sample left out, named (file, line or shard member, reason, detail)."""
        file = self.path / self.manifest.get("skipped_items", SKIPPED)
        return Skips.read(file) if file.is_file() else Skips()

    def dataset(self, sample: bool = True, generator: torch.Generator | None = None) -> LatentDataset:
        return LatentDataset(self, sample=sample, generator=generator)


class LatentDataset(Dataset):
    """Items {"latents", "text", "text_mask", "index"}; latents are a fresh posterior draw each read.

    latents = (mean + exp(logvar / 2) * eps - shift_factor) * scaling_factor, eps ~ N(0, I), as
    `vae.encode(x).latent_dist.sample()` would give; with sample=False, the scaled mean.
    """

    def __init__(self, cache: LatentCache, sample: bool = True, generator: torch.Generator | None = None):
        self.cache = cache
        self.sample = sample
        self.generator = generator
        self.scale = float(cache.manifest["scaling_factor"])
        self.shift = float(cache.manifest.get("shift_factor", 0.0))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        mean, logvar, text, mask = self.cache.moments(int(index))
        latents = mean
        if self.sample:
            eps = torch.randn(mean.shape, generator=self.generator, dtype=mean.dtype)
            latents = mean + torch.exp(0.5 * logvar) * eps
        return {
            "latents": (latents - self.shift) * self.scale,
            "text": text.float(),
            "text_mask": mask.long(),
            "index": int(index),
        }


def open_cache(path: str | Path) -> LatentCache:
    """Open a complete cache; NasError if missing, interrupted, or not a cache, CacheDamaged (a
    NasError naming the file and the repair command) if a file fails the cheap checks."""
    path = Path(path)
    manifest = read_manifest(path)
    check_open(path, manifest)
    return LatentCache(path, manifest)


def read_manifest(path: Path) -> dict:
    """The manifest of a complete cache, its files unchecked; NasError if there is none."""
    if not path.is_dir():
        raise NasError(f"{path}: latent cache not found (make one with `nas precompute`)")
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        if (path / "plan.json").is_file():
            raise NasError(
                f"{path}: cache is incomplete (precompute was interrupted); "
                "rerun the same `nas precompute` command to finish it"
            )
        raise NasError(f"{path}: not a nas latent cache (no manifest.json)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as exc:
        raise NasError(f"{manifest_file}: not valid JSON ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise NasError(f"{manifest_file}: format {manifest.get('format')!r}, this nas reads {FORMAT!r}")
    return manifest
