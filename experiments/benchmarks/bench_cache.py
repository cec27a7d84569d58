"""Training-step time with the latent cache vs encoding with the VAE and text encoder on the fly.

Same U-Net, batch, optimizer and noise in both arms; only where latents and caption states come
from differs. Arms alternate in rounds so that drifting load on a shared machine hits both alike;
the median step is reported. Also measures reading one batch from the cache against the U-Net step
it feeds (the loader must never make a step wait).

    python experiments/benchmarks/bench_cache.py --data scratch/m/shapes/train --vae scratch/m/vae \
        --cache scratch/m/cache [--batch 32] [--steps 10] [--rounds 3] [--out scratch/bench_cache.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared CPUs: spinning OpenMP threads cost 10x

import torch
from diffusers import UNet2DConditionModel

from nas.data.cache import open_cache
from nas.data.encoders import load_text_encoder, load_vae
from nas.data.folders import open_source, to_tensor


def build_unet(cache, channels: tuple[int, ...]) -> UNet2DConditionModel:
    """A small cross-attention U-Net for the cache's latents (attention below full resolution)."""
    m = cache.manifest
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=m["latent_size"],
        in_channels=m["latent_channels"],
        out_channels=m["latent_channels"],
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=m["text_dim"],
        attention_head_dim=8,
        norm_num_groups=32,
    )


def unet_step(unet, optimizer, latents, text, generator) -> None:
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (len(latents),), generator=generator)
    alpha = (1 - t.float() / 1000)[:, None, None, None]  # any schedule: the cost is the same
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=text).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the folder the cache was made from")
    p.add_argument("--vae", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per arm and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (cache, on the fly)")
    p.add_argument("--channels", default="64,128,256", help="U-Net block_out_channels")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cache = open_cache(args.cache)
    source = open_source(args.data)
    vae = load_vae(args.vae)
    text_encoder = load_text_encoder(args.text_encoder, cache.manifest["text_len"])
    scale = cache.manifest["scaling_factor"]
    resolution = cache.manifest["resolution"]
    unet = build_unet(cache, tuple(int(c) for c in args.channels.split(",")))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    dataset = cache.dataset()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(cache), generator=g).tolist()
    cursor = 0

    def next_indices() -> list[int]:
        nonlocal cursor
        out = [order[(cursor + i) % len(order)] for i in range(args.batch)]
        cursor += args.batch
        return out

    def cached_batch():
        items = [dataset[i] for i in next_indices()]
        return torch.stack([it["latents"] for it in items]), torch.stack([it["text"] for it in items])

    @torch.no_grad()
    def fly_batch():
        # Cache item order == source entry order (no image of these folders is skipped).
        idx = [cache.records()[i]["source_index"] for i in next_indices()]
        images = torch.stack([to_tensor(source.load(source.entries[i], resolution)) for i in idx])
        latents = vae.encode(images).latent_dist.sample(generator=g) * scale
        text, _ = text_encoder.encode([source.entries[i].text for i in idx])
        return latents, text

    times: dict[str, list[float]] = {"cache": [], "on_the_fly": [], "cache_read": [], "fly_encode": []}
    for get in (cached_batch, fly_batch):  # warm-up both
        for _ in range(2):
            unet_step(unet, optimizer, *get(), g)
    for _ in range(args.rounds):
        for arm, get, part in (
            ("cache", cached_batch, "cache_read"),
            ("on_the_fly", fly_batch, "fly_encode"),
        ):
            for _ in range(args.steps):
                start = time.perf_counter()
                latents, text = get()
                loaded = time.perf_counter()
                unet_step(unet, optimizer, latents, text, g)
                end = time.perf_counter()
                times[arm].append(end - start)
                times[part].append(loaded - start)

    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    unet_ms = ms["cache"] - ms["cache_read"]
    result = {
        "batch": args.batch,
        "unet_channels": args.channels,
        "unet_parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "step_ms_cache": round(ms["cache"], 1),
        "step_ms_on_the_fly": round(ms["on_the_fly"], 1),
        "ratio_on_the_fly_over_cache": round(ms["on_the_fly"] / ms["cache"], 2),
        "step_compute_saved": round(1 - ms["cache"] / ms["on_the_fly"], 3),
        "cache_read_ms_per_batch": round(ms["cache_read"], 2),
        "cache_read_us_per_item": round(1000 * ms["cache_read"] / args.batch, 1),
        "encode_ms_per_batch_on_the_fly": round(ms["fly_encode"], 1),
        "unet_step_ms": round(unet_ms, 1),
        "cache_in_memory": cache.in_memory,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg()[0],
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(
        f"step: {ms['cache']:.1f} ms from the cache vs {ms['on_the_fly']:.1f} ms encoding on the fly "
        f"(x{result['ratio_on_the_fly_over_cache']}, {100 * result['step_compute_saved']:.0f}% saved); "
        f"reading a batch from the cache: {ms['cache_read']:.2f} ms ({100 * ms['cache_read'] / ms['cache']:.1f}% of a step)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
