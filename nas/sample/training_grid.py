"""The sample grid a training run sends to its tracker (`sample_every:` in the train config).

`nas train` passes `TrainingGrid` to the trainer (nas/train/loop.py `train_arch(sampler=...)`): the
training floor does not import the sampler. A grid is the sampler's own: the U-Net being trained,
the cache's VAE and text encoder (`load_encoders`, checked against the manifest), the run's recipe,
a `StableDiffusionPipeline` (`build_pipeline`) and `generate` / `sample_grid` of `nas sample`; only
the settings are small: a few held-out captions, one fixed seed, a few DDIM steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nas.sample.components import RunComponents, load_encoders
from nas.sample.generate import SampleSettings, build_pipeline, generate, sample_grid, to_uint8

GRID_PROMPTS = 4  # the first held-out captions of the cache (the trainer's last val_items items)
GRID_SEED = 0  # every image starts from torch.Generator().manual_seed(0): the same noise each time
# 8 DDIM steps (trailing spacing) with SD 1.5's guidance 7.5: enough to see the prompt take shape,
# a quarter of `nas sample`'s 30, so a grid costs 8 x 4 guided U-Net calls and 4 VAE decodes
GRID_SETTINGS = SampleSettings(steps=8, guidance=7.5, scheduler="ddim", spacing="trailing", batch_size=4)


class TrainingGrid:
    """`grid(unet)` -> uint8 [H, W, 3]: the labelled grid of `unet` as it is now (eval mode for the
    draw, its mode restored). The VAE and text encoder load at the first call (rank 0 only calls)."""

    def __init__(self, cache, config, prompts: list[str] | None = None):
        self.cache, self.recipe = cache, config.diffusion
        captions = cache.captions()
        held_out = captions[len(captions) - min(config.val_items, len(captions)) :]
        self.jobs = [(prompt, GRID_SEED) for prompt in (prompts or held_out[:GRID_PROMPTS])]
        self.encoders: tuple | None = None

    def _components(self, unet) -> RunComponents:
        device = next(unet.parameters()).device
        if self.encoders is None:
            vae, text_encoder = load_encoders(self.cache.manifest, getattr(self.cache, "path", "cache"))
            self.encoders = (vae.eval().to(device), text_encoder.to(device))
        vae, text_encoder = self.encoders
        empty, _ = self.cache.empty_text()
        return RunComponents(
            run=Path(str(getattr(self.cache, "path", "cache"))),
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            empty_text=empty.float().to(device),
            recipe=self.recipe,
            manifest=self.cache.manifest,
            cache=self.cache,
            weights="training",
            model_sha256="",
        )

    @torch.no_grad()
    def __call__(self, unet) -> np.ndarray:
        was_training = unet.training
        unet.eval()
        try:
            components = self._components(unet)
            pipe = build_pipeline(components, GRID_SETTINGS.scheduler, GRID_SETTINGS.spacing)
            images = generate(components, pipe, self.jobs, GRID_SETTINGS, progress=False)
        finally:
            unet.train(was_training)
        return sample_grid(to_uint8(images), self.jobs, GRID_SETTINGS, columns=len(self.jobs))
