"""`nas precompute --verify CACHE` and `--repair CACHE`: check every checksum; recompute bad shards.

Repair opens the source data, VAE and text encoder the manifest records (or the `--data` / `--vae`
given instead, which must be the same: the listing's and the weights' sha256 are compared), then
reruns the cache's own precompute: it keeps every file whose header and checksum are good and
encodes again only the bad ones, with the recorded batch size, device and caption key. On the CPU
the encoders are deterministic, so a repaired shard is byte-identical to the original; each
repaired shard is reported as identical or not. A cache made before checksums were recorded gets
them (for its files as they are now: only a header or size fault can be found in it).
"""

from __future__ import annotations

import time
from pathlib import Path

from nas.core.errors import NasError
from nas.data.cache import precompute, read_manifest
from nas.data.verify import cache_files, has_checksums, verify

EXIT_BAD = 2  # some file is bad: the CLI's code for a user-fixable problem


def verify_cache(path: str | Path) -> int:
    """Check every file of the cache at `path`; print a summary; 0 if all good, 2 if any is bad."""
    path = Path(path)
    manifest = read_manifest(path)
    start = time.perf_counter()
    bad = verify(path, manifest)
    seconds = time.perf_counter() - start
    files = [path / f for f, _, _ in cache_files(manifest)]
    size = sum(f.stat().st_size for f in files if f.is_file())
    summary = f"verified {len(files)} files of {path} ({size / 1e6:.1f} MB) in {seconds:.2f} s"
    if bad:
        print(f"{summary}: {len(bad)} bad; repair with `nas precompute --repair {path}`")
        return EXIT_BAD
    print(f"{summary}: all good")
    if not has_checksums(manifest):
        print(
            f"{path} was made before nas recorded checksums: sizes and headers checked, data bytes "
            f"not; `nas precompute --repair {path}` records them"
        )
    return 0


def _gone(path: Path, what: str, kind: str, flag: str | None, problem: str) -> NasError:
    instead = f"pass {flag} with the same {what}, or " if flag else ""
    return NasError(
        f"{path}: cannot repair: the {kind} it was made from ({problem}); "
        f"{instead}make the cache again with `nas precompute`"
    )


def repair_cache(
    path: str | Path,
    data: str | None = None,
    vae: str | None = None,
    device: str | None = None,
    caption_key: str | None = None,
) -> int:
    """Recompute the bad files of the cache at `path` from its recorded source; 0 when repaired."""
    import torch

    from nas.data.encoders import load_text_encoder, load_vae, vae_identity
    from nas.data.folders import open_source

    path = Path(path)
    manifest = read_manifest(path)
    bad = verify(path, manifest)
    if not bad and has_checksums(manifest):
        print(f"{path}: all files good; nothing to repair")
        return 0
    encode = manifest.get("encode", {})  # absent in caches made before it was recorded
    source_path = data or manifest["source"]["path"]
    try:
        source = open_source(source_path, caption_key=caption_key or encode.get("caption_key", "text"))
    except NasError as exc:
        raise _gone(path, "data", "source data", "--data", str(exc)) from None
    if source.fingerprint()["listing_sha256"] != manifest["source"]["listing_sha256"]:
        raise _gone(path, "data", "source data", "--data", f"{source_path} now lists other items or captions")
    vae_path = vae or manifest["vae"]["path"]
    try:
        identity = vae_identity(vae_path)
    except NasError as exc:
        raise _gone(path, "VAE", "VAE", "--vae", str(exc)) from None
    if identity["sha256"] != manifest["vae"]["sha256"]:
        raise _gone(path, "VAE", "VAE", "--vae", f"{vae_path} holds other weights")
    encoder = manifest["text_encoder"]
    try:
        text_encoder = load_text_encoder(encoder["path"], manifest["text_len"])
    except NasError as exc:
        raise _gone(path, "text encoder", "text encoder", None, str(exc)) from None
    if text_encoder.identity["sha256"] != encoder["sha256"]:
        raise _gone(path, "text encoder", "text encoder", None, f"{encoder['path']} holds other weights")
    device = device or encode.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        device = "cpu"
    model = load_vae(vae_path).to(device)
    new = precompute(
        source,
        model,
        identity,
        text_encoder.to(device),
        path,
        manifest["resolution"],
        batch_size=encode.get("batch_size", 64),
        shard_size=manifest["shard_size"],
        text_dtype=manifest["text_dtype"],
        caption_key=caption_key or encode.get("caption_key", "text"),
    )
    before = {s["file"]: s.get("sha256") for s in manifest["shards"]}
    before.update({f: r.get("sha256") for f, r in manifest.get("files", {}).items()})
    after = {s["file"]: s["sha256"] for s in new["shards"]}
    after.update({f: r["sha256"] for f, r in new["files"].items()})
    for file, _ in bad:
        if before.get(file) is None:
            print(f"repaired {path / file} (no checksum was recorded to compare with)")
        elif before[file] == after.get(file):
            print(f"repaired {path / file}: byte-identical to the original")
        else:
            print(f"repaired {path / file}: recomputed, bytes differ from the original (encoder not "
                  f"deterministic on {device}); its new checksum is recorded")  # fmt: skip
    if not has_checksums(manifest):
        print(f"{path}: checksums recorded for all {len(new['shards'])} shards as they are now")
    return 0
