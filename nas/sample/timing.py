"""Where the time of an image goes: text encoder, U-Net calls, VAE decode and the rest, measured in
the sampler's own process while it generates (`nas eval`, `nas compare`, experiments).

At 50 steps with classifier-free guidance the U-Net is nearly all of an image's time; at 1-4 steps
of a few-step student the text encoder and the VAE decoder are a real share, so a U-Net speed-up no
longer translates into images/s (DeciDiffusion's own table splits its speed-up this way). The clock
wraps the three parts of one pipeline while it runs:

- text encoder: `generate`'s prompt encoding (one call per batch);
- U-Net: every forward of `pipe.unet` (forward pre/post hooks; any runtime wrapper is a Module);
- VAE decode: `pipe.vae.decode`;
- other: the rest of the wall time (scheduler steps, latents set-up, postprocessing to numpy).

On CUDA every boundary synchronises the device, so a part is charged with its own kernels (this
costs a little throughput; the U-Net's ms per call is then exact).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PARTS = ("text_encoder", "unet", "vae_decode")


@dataclass
class StageClock:
    """Seconds per part of image generation, accumulated over any number of `generate` calls."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    unet_forwards: int = 0  # U-Net calls (a CFG step at batch B is one call on 2B latents)
    unet_evals: int = 0  # latents through the U-Net: per image, 2 per CFG step, 1 per guidance-embedded step
    images: int = 0
    total: float = 0.0  # wall seconds of the generate calls timed

    def _sync(self, device) -> None:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    @contextmanager
    def part(self, name: str, device=None):
        self._sync(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync(device)
            self.seconds[name] += time.perf_counter() - start

    @contextmanager
    def attached(self, pipe, device=None):
        """Time `pipe.unet`'s forwards and `pipe.vae.decode` while inside; the whole block as total."""
        started: list[float] = []

        def before(module, args, kwargs):
            self._sync(device)
            started.append(time.perf_counter())

        def after(module, args, kwargs, output):
            self._sync(device)
            self.seconds["unet"] += time.perf_counter() - started.pop()
            self.unet_forwards += 1
            sample = args[0] if args else kwargs.get("sample")
            self.unet_evals += int(sample.shape[0]) if sample is not None else 0

        hooks = [
            pipe.unet.register_forward_pre_hook(before, with_kwargs=True),
            pipe.unet.register_forward_hook(after, with_kwargs=True),
        ]
        vae = pipe.vae
        decode = vae.decode  # the bound method; restored on exit

        def timed_decode(*args, **kwargs):
            with self.part("vae_decode", device):
                return decode(*args, **kwargs)

        vae.decode = timed_decode
        self._sync(device)
        start = time.perf_counter()
        try:
            yield self
        finally:
            self._sync(device)
            self.total += time.perf_counter() - start
            for hook in hooks:
                hook.remove()
            del vae.decode  # back to the class's method

    def report(self) -> dict:
        """JSON-ready: images/s end to end, seconds and share of each part, U-Net ms per call."""
        total = max(self.total, 1e-9)
        other = max(self.total - sum(self.seconds.values()), 0.0)
        out: dict = {
            "images": self.images,
            "seconds": round(self.total, 4),
            "images_per_s": round(self.images / total, 4),
            "unet_forwards": self.unet_forwards,
            "unet_batch": round(self.unet_evals / max(self.unet_forwards, 1), 3),  # latents per forward
            # the issue tables' "U-Net calls per image": 2 per CFG step, 1 per guidance-embedded step
            "unet_evals_per_image": round(self.unet_evals / max(self.images, 1), 3),
            "unet_ms_per_forward": round(1000 * self.seconds["unet"] / max(self.unet_forwards, 1), 3),
        }
        for name, seconds in (*self.seconds.items(), ("other", other)):
            out[f"{name}_s"] = round(seconds, 4)
            out[f"{name}_share"] = round(seconds / total, 4)
        return out


def split_line(report: dict) -> str:
    """One line: images/s and the split, e.g. '12.3 images/s; text encoder 8%, U-Net 80% (..)'."""
    names = {"text_encoder": "text encoder", "unet": "U-Net", "vae_decode": "VAE decode", "other": "other"}
    parts = [f"{label} {100 * report[f'{key}_share']:.0f}%" for key, label in names.items()]
    return (
        f"{report['images_per_s']:.2f} images/s; {', '.join(parts)} "
        f"({report['unet_evals_per_image']:g} U-Net evaluations/image, {report['unet_ms_per_forward']:.2f} ms "
        f"per call at batch {report['unet_batch']:g})"
    )
