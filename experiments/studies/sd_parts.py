"""Stable Diffusion 1.5's parts at their true configs with random weights, saved with save_pretrained
as a user's SD folder holds them (unet/, vae/, text_encoder/, tokenizer/), for
experiments/studies/sd_scale.py; and the same parts at test size.

The configs are those of runwayml/stable-diffusion-v1-5's `unet/`, `vae/` and `text_encoder/`
config.json (the U-Net from search_spaces/archs/sd15.yaml). The tokenizer is CLIP's kind (byte-level
BPE, CLIPTokenizer) with a vocabulary built offline: CLIP's 512 byte symbols plus merges learned on
the run's own captions. The text model keeps CLIP's 49,408-row embedding (123M parameters, as SD's),
of which the small vocabulary uses the first rows.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import torch

SD_VAE = dict(  # runwayml/stable-diffusion-v1-5 vae/config.json: 83,653,863 parameters
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SMALL_VAE = dict(SD_VAE, block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=8)
SD_TEXT = dict(  # text_encoder/config.json (CLIP ViT-L/14's text tower): 123,060,480 parameters
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
# test size: the tiny archs' 384-wide, 32-token text (search_spaces/archs/tiny_*.yaml)
SMALL_TEXT = dict(SD_TEXT, vocab_size=1024, hidden_size=384, intermediate_size=512, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=32, projection_dim=384)  # fmt: skip
MERGES = 400  # BPE merges learned on the captions (CLIP has 48,894; the captions need far fewer)
START, END = "<|startoftext|>", "<|endoftext|>"


def learn_merges(texts: list[str], count: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges, most frequent pair first, over the words of `texts` as CLIP splits
    them (lower case, whitespace; the last symbol of a word carries '</w>')."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte = bytes_to_unicode()
    words: Counter = Counter()
    for text in texts:
        for word in text.lower().replace(",", " , ").split():
            symbols = [byte[b] for b in word.encode("utf-8")]
            words[(*symbols[:-1], symbols[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def save_tokenizer(folder: Path, texts: list[str], max_length: int, merges: int = MERGES) -> int:
    """CLIPTokenizer with CLIP's vocabulary rule (bytes, bytes + '</w>', merges, then the two
    special tokens) over merges learned on `texts`; returns the vocabulary size."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    learned = learn_merges(texts, merges)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in learned] + [START, END]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=learned)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)
    return len(vocab)


def save_parts(root: Path, arch_path: Path, captions: list[str], small: bool = False, seed: int = 0) -> dict:
    """ROOT/{unet,vae,text_encoder,tokenizer} (random weights, safetensors); returns their sizes."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from nas.space import build_unet, load_arch

    text = SMALL_TEXT if small else SD_TEXT
    vocab = save_tokenizer(root / "tokenizer", captions, text["max_position_embeddings"])
    torch.manual_seed(seed)
    config = CLIPTextConfig(**{**text, "vocab_size": max(text["vocab_size"], vocab)},
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)  # fmt: skip
    encoder = CLIPTextModel(config)
    encoder.save_pretrained(root / "text_encoder")
    sizes = {"text_encoder_params": sum(p.numel() for p in encoder.parameters()), "vocab": vocab}
    del encoder
    vae = AutoencoderKL(**(SMALL_VAE if small else SD_VAE))
    vae.save_pretrained(root / "vae", safe_serialization=True)
    sizes["vae_params"] = sum(p.numel() for p in vae.parameters())
    del vae
    unet = build_unet(load_arch(arch_path))
    unet.save_pretrained(root / "unet", safe_serialization=True)
    sizes["unet_params"] = sum(p.numel() for p in unet.parameters())
    sizes["bytes"] = {d: sum(f.stat().st_size for f in (root / d).rglob("*") if f.is_file())
                      for d in ("unet", "vae", "text_encoder", "tokenizer")}  # fmt: skip
    (root / "parts.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes
