"""The guidance-scale embedding of guidance-distilled U-Nets (LCM; Luo et al. 2023, "Latent
Consistency Models"): a U-Net with `time_cond_proj_dim` set takes w through `timestep_cond` and does
classifier-free guidance in one call, with no negative-prompt half.

The formula is diffusers' `get_guidance_scale_embedding` (LatentConsistencyModelPipeline, from VDM's
`get_timestep_embedding`), written here as a function because diffusers has it only as a pipeline
method: sinusoids of 1000 * w at geometric frequencies 10000**(-i / (half - 1)), sines then cosines.

Convention: w is the weight in x = cond + w * (cond - uncond), so a pipeline's `guidance_scale`
is w + 1 (diffusers' LCM pipeline embeds `guidance_scale - 1`). This module imports only torch.
"""

from __future__ import annotations

import math

import torch

W_SCALE = 1000.0  # w is multiplied by this before the sinusoids (diffusers: `w = w * 1000.0`)
MAX_PERIOD = 10000.0  # the lowest frequency's period (diffusers, as for timesteps)


def guidance_embedding(w: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B] guidance weights -> [B, dim] embedding, equal to diffusers' get_guidance_scale_embedding."""
    if w.ndim != 1:
        raise ValueError(f"w must be one weight per sample (shape [B]), got shape {tuple(w.shape)}")
    if dim < 4:
        raise ValueError(f"embedding width {dim} < 4: needs at least two frequencies")
    half = dim // 2
    step = math.log(MAX_PERIOD) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -step)
    angles = (w * W_SCALE).to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:  # an odd width: zero-padded, as diffusers does
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
