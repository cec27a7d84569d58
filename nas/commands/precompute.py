"""Encode a dataset once into a latent cache: VAE posterior moments and caption hidden states.

Rerunning the same command after a kill continues where it stopped and ends with the same content;
a cache made with other encoders, resolution or data is refused, never mixed. See docs/data.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from nas.core.errors import NasError
from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("precompute",)
    data: str | None = arg(
        None,
        "folder with metadata.jsonl, folder of .tar shards, one .tar, or a shard pattern "
        "('shards/{00000..00009}.tar'); required unless --verify (with --repair: the same data, moved)",
        input="data",
    )
    vae: str | None = arg(
        None,
        "diffusers AutoencoderKL folder (or a pipeline folder); required unless --verify/--repair",
        input="vae",
    )
    text_encoder: str = arg(
        "minilm", "'minilm' (bundled) or a local transformers folder", input="text_encoder"
    )
    out: str | None = arg(
        None, "cache folder (new, or the same command's unfinished one); required unless --verify/--repair"
    )
    resolution: int | None = arg(None, "pixels, square (default: the VAE's sample_size)", ge=8, le=4096)
    batch: int = arg(64, "images per encoder call", ge=1, le=4096)
    shard_size: int = arg(1024, "source samples per shard", ge=1, le=1_000_000)
    max_length: int | None = arg(
        None, "caption tokens (default: 32 for minilm, else the tokenizer's)", ge=1, le=4096
    )
    caption_key: str = arg("text", "metadata.jsonl key holding the caption")
    text_dtype: Literal["float16", "float32"] = arg("float16", "stored text dtype")
    device: str | None = arg(None, "cpu or cuda (default: cuda if available)")
    verify: str | None = arg(None, "check every file's checksum of this cache (exit 2 if any is bad)")
    repair: str | None = arg(None, "recompute only the bad shards of this cache from its recorded source")


SETTINGS = Settings


def dry_run(settings: Settings) -> dict:
    """The data it would encode and the resolution it would use (reads the VAE's config only)."""
    if _check_mode(settings):
        return {}
    assert settings.data and settings.vae and settings.out  # _check_mode
    from nas.data.cache import check_out_folder
    from nas.data.encoders import load_vae
    from nas.data.folders import open_source

    check_out_folder(Path(settings.out))
    source = open_source(settings.data, caption_key=settings.caption_key)
    vae = load_vae(Path(settings.vae))
    return {
        "source": source.fingerprint(),
        "skipped_while_listing": source.skips.summary(),  # images are checked only when encoded
        "resolved_resolution": settings.resolution or int(vae.config.sample_size),
    }


def run(settings: Settings) -> int:
    from nas.core.lock import exclusive

    # one writer per cache folder, --repair's too; --verify only reads (docs/reliability.md)
    with exclusive(settings.out or settings.repair):
        return _run(settings)


def _run(settings: Settings) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if _check_mode(settings):  # nas/data/repair.py
        from nas.data import repair

        if settings.verify:
            return repair.verify_cache(settings.verify)
        key = settings.caption_key if settings.caption_key != "text" else None  # default: recorded
        return repair.repair_cache(str(settings.repair), settings.data, settings.vae, settings.device, key)
    assert settings.data and settings.vae and settings.out  # _check_mode
    from nas.data.cache import check_out_folder
    from nas.data.folders import open_source

    out, vae_path = Path(settings.out), Path(settings.vae)
    check_out_folder(out)
    source = open_source(settings.data, caption_key=settings.caption_key)

    import torch

    from nas.data.cache import precompute
    from nas.data.encoders import load_text_encoder, load_vae, vae_identity

    vae = load_vae(vae_path)
    resolution = settings.resolution or int(vae.config.sample_size)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text_encoder = load_text_encoder(settings.text_encoder, settings.max_length).to(device)
    vae.to(device)
    start = time.perf_counter()
    manifest = precompute(
        source,
        vae,
        vae_identity(vae_path),
        text_encoder,
        out,
        resolution,
        batch_size=settings.batch,
        shard_size=settings.shard_size,
        text_dtype=settings.text_dtype,
        caption_key=settings.caption_key,
    )
    seconds = time.perf_counter() - start
    print(
        f"cache {out}: {manifest['count']} items, "
        f"latents {manifest['latent_channels']}x{manifest['latent_size']}x{manifest['latent_size']}, "
        f"text {manifest['text_len']}x{manifest['text_dim']}, {seconds:.1f} s"
    )
    print(skipped_line(out / manifest["skipped_items"]))
    return 0


def _check_mode(settings: Settings) -> bool:
    """--verify or --repair (alone); otherwise --data, --vae and --out are required (NasError)."""
    if settings.verify and settings.repair:
        raise NasError("--verify and --repair: give one (--repair verifies first)")
    if settings.verify or settings.repair:
        return True
    missing = [f"--{n}" for n in ("data", "vae", "out") if getattr(settings, n) is None]
    if missing:
        raise NasError(f"{', '.join(missing)}: required (or --verify CACHE / --repair CACHE)")
    return False


def skipped_line(file: Path) -> str:
    """'skipped 3: 2 missing file (a.png line 4, ...); 1 corrupt image (...); all in CACHE/skipped.jsonl'."""
    from nas.data.skips import Skips

    skips = Skips.read(file)
    return f"{skips.summary()}; all in {file}" if skips else skips.summary()
