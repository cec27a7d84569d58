"""The diffusion objective: noise schedule, prediction target, Min-SNR weighting, loss.

Everything numeric comes from diffusers: betas and the forward process from `DDPMScheduler`
(`beta_schedule`, `rescale_betas_zero_snr`), the v target from `get_velocity`, the SNR from
`diffusers.training_utils.compute_snr`. What diffusers lacks is the Min-SNR weight itself (Hang et al.
2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), written here in closed form:

    epsilon:       w(t) = min(SNR(t), gamma) / SNR(t)
    v_prediction:  w(t) = min(SNR(t), gamma) / (SNR(t) + 1)

With zero terminal SNR (Lin et al. 2023) SNR(T) = 0 and the epsilon form is 0/0; its limit as
SNR -> 0 is 1 (for SNR < gamma the ratio is SNR/SNR), which is the value used.

`scheduler_config(recipe)` is the one description of the schedule; the trainer builds its
`DDPMScheduler` from it and the sampler builds DDIM/Euler/DPM-Solver from the same dict.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from nas.core import limits as L
from nas.core.config import Strict

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction")


class Recipe(Strict):
    """The diffusion part of a training config (also what a sampler needs to match training)."""

    # squaredcos_cap_v2 = cosine (Nichol & Dhariwal 2021); scaled_linear = SD 1.5; linear = DDPM (Ho 2020)
    schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    # rescale betas so alphas_cumprod[T-1] = 0: the last step is pure noise (Lin et al. 2023)
    zero_terminal_snr: bool = True
    # what the U-Net predicts; v (Salimans & Ho 2022) stays well-posed at zero SNR, epsilon does not
    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"
    # Min-SNR-gamma loss weight (Hang et al. 2023: gamma = 5); null = unweighted MSE
    min_snr_gamma: float | None = Field(5.0, gt=0, le=L.MAX_MIN_SNR_GAMMA)
    # discrete diffusion steps (DDPM, SD: 1000); bound in nas/core/limits.py
    num_train_timesteps: int = Field(1000, ge=2, le=L.MAX_TRAIN_TIMESTEPS)
    beta_start: float = Field(0.00085, gt=0, lt=1)  # linear/scaled_linear only (SD 1.5: 0.00085)
    beta_end: float = Field(0.012, gt=0, lt=1)  # linear/scaled_linear only (SD 1.5: 0.012)
    # sampling grid: trailing always starts at t=T-1 (Lin et al. 2023); SD 1.5 shipped "leading"
    timestep_spacing: Literal["leading", "linspace", "trailing"] = "trailing"


def scheduler_config(recipe: Recipe) -> dict[str, Any]:
    """Config dict any diffusers noise scheduler's `from_config` accepts (DDPM, DDIM, Euler, DPM)."""
    return {
        "num_train_timesteps": recipe.num_train_timesteps,
        "beta_schedule": recipe.schedule,
        "beta_start": recipe.beta_start,
        "beta_end": recipe.beta_end,
        "rescale_betas_zero_snr": recipe.zero_terminal_snr,
        "prediction_type": recipe.prediction,
        "timestep_spacing": recipe.timestep_spacing,
        # SD 1.5 pairs "leading" with offset 1 (its scheduler_config.json); trailing needs none
        "steps_offset": 1 if recipe.timestep_spacing == "leading" else 0,
        "clip_sample": False,  # latents are not in [-1, 1]; DDPM/DDIM clip by default
        "set_alpha_to_one": False,  # DDIM: final step uses alphas_cumprod[0], as SD 1.5 does
    }


def noise_scheduler(recipe: Recipe):
    """The training scheduler: `DDPMScheduler` (exact alphas_cumprod, last one 0 with zero SNR)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler_config(recipe))


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the U-Net should output: the noise (epsilon) or the velocity (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported (allowed: {', '.join(PREDICTIONS)})")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alphas_cumprod / (1 - alphas_cumprod), one value per timestep (0 at a zero-SNR end)."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def min_snr_weights(snr_values: torch.Tensor, gamma: float | None, prediction: str) -> torch.Tensor:
    """Per-sample loss weights (Hang et al. 2023); all ones when `gamma` is None.

    The epsilon form min(SNR, g)/SNR equals 1 wherever SNR < g, so it is written as
    `where(SNR < g, 1, g/SNR)`: same values, and 1 (the limit) instead of 0/0 at SNR = 0.
    """
    snr_values = snr_values.float()
    if gamma is None:
        return torch.ones_like(snr_values)
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction == "epsilon":
        return torch.where(snr_values < gamma, torch.ones_like(snr_values), gamma / snr_values)
    if prediction == "v_prediction":
        return clipped / (snr_values + 1)
    raise ValueError(f"prediction {prediction!r} is not supported (allowed: {', '.join(PREDICTIONS)})")


def loss_weights(scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR weights for `timesteps` under the scheduler's prediction type."""
    if gamma is None:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    return min_snr_weights(snr(scheduler, timesteps), gamma, scheduler.config.prediction_type)


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted MSE per sample (mean over channels and pixels), in float32 whatever the autocast dtype."""
    mse = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return mse * weights.to(mse.device)


def diffusion_loss(
    model: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    text: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    gamma: float | None,
) -> torch.Tensor:
    """Per-sample loss of `model` on (latents, text) noised with `noise` at `timesteps`.

    The U-Net gets no attention mask: diffusers' StableDiffusionPipeline never passes one, and an
    exported pipeline must see what training saw (padding tokens included).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    prediction = model(noisy, timesteps, encoder_hidden_states=text).sample
    return per_sample_loss(prediction, target, loss_weights(scheduler, timesteps, gamma))
