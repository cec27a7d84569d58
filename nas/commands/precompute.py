"""Encode a dataset once into a latent cache: VAE posterior moments and caption hidden states.

Rerunning the same command after a kill continues where it stopped and ends with the same content;
a cache made with other encoders, resolution or data is refused, never mixed. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="folder with metadata.jsonl, folder of .tar shards, "
        "one .tar, or a shard pattern ('shards/{00000..00009}.tar')",
    )
    p.add_argument(
        "--vae", type=Path, required=True, help="diffusers AutoencoderKL folder (or a pipeline folder)"
    )
    p.add_argument(
        "--text-encoder", default="minilm", help="'minilm' (bundled) or a local transformers folder"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="cache folder (new, or the same command's unfinished one)"
    )
    p.add_argument("--resolution", type=int, help="pixels, square (default: the VAE's sample_size)")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--shard-size", type=int, default=1024, help="source samples per shard (default 1024)")
    p.add_argument(
        "--max-length", type=int, help="caption tokens (default: 32 for minilm, else the tokenizer's)"
    )
    p.add_argument(
        "--caption-key", default="text", help="metadata.jsonl key holding the caption (default text)"
    )
    p.add_argument(
        "--text-dtype", default="float16", choices=("float16", "float32"), help="stored text dtype"
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dry-run", action="store_true", help="list the data, print the settings and exit")


def run(args) -> int:
    # Before torch loads OpenMP: on a shared CPU, spinning threads made steps 10x slower (measured).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from nas.data.cache import check_out_folder
    from nas.data.folders import open_source
    from nas.errors import NasError

    if args.batch < 1 or args.shard_size < 1:
        raise NasError(f"--batch and --shard-size must be >= 1 (got {args.batch}, {args.shard_size})")
    check_out_folder(args.out)
    source = open_source(args.data, caption_key=args.caption_key)

    import torch

    from nas.data.cache import precompute
    from nas.data.encoders import load_text_encoder, load_vae, vae_identity

    vae = load_vae(args.vae)
    resolution = args.resolution or int(vae.config.sample_size)
    if args.dry_run:
        print(
            json.dumps(
                {
                    "source": source.fingerprint(),
                    "resolution": resolution,
                    "vae": str(args.vae),
                    "text_encoder": args.text_encoder,
                    "out": str(args.out),
                },
                indent=2,
            )
        )
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    text_encoder = load_text_encoder(args.text_encoder, args.max_length).to(device)
    vae.to(device)
    start = time.perf_counter()
    manifest = precompute(
        source,
        vae,
        vae_identity(args.vae),
        text_encoder,
        args.out,
        resolution,
        batch_size=args.batch,
        shard_size=args.shard_size,
        text_dtype=args.text_dtype,
    )
    seconds = time.perf_counter() - start
    reasons = ", ".join(f"{n} {r}" for r, n in manifest["skipped_reasons"].items()) or "none"
    print(
        f"cache {args.out}: {manifest['count']} items, skipped {manifest['skipped']} ({reasons}), "
        f"latents {manifest['latent_channels']}x{manifest['latent_size']}x{manifest['latent_size']}, "
        f"text {manifest['text_len']}x{manifest['text_dim']}, {seconds:.1f} s"
    )
    return 0
