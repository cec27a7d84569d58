"""Data layer: the embedded `shapes` dataset, dataset readers, VAE and text encoders, the latent cache.
Modules import torch/diffusers themselves; importing this package is cheap.

    shapes     procedural captioned dataset (labels kept for evaluation)
    folders    image folder + metadata.jsonl and WebDataset tar shards, resize/crop, skip-and-count
    skips      Skip/Skips: each skipped sample named (file, line or shard member, reason)
    encoders   load_vae, load_text_encoder (TextEncoder), train_vae
    cache      precompute (resumable shards + manifest), open_cache -> LatentCache
    verify     per-file size/header checks at every open, `--verify` checksums
    repair     `--repair`: re-encode only the damaged shards from the recorded source

The classifier that reads `shapes` images (alignment, features, Frechet distance) is an evaluator:
nas/evaluate/shapes_evaluator.py.
"""
