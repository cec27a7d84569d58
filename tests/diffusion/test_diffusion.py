"""The diffusion objective against closed forms: betas, zero terminal SNR, v target, Min-SNR weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from nas.diffusion import (
    Recipe,
    diffusion_loss,
    loss_weights,
    min_snr_weights,
    noise_scheduler,
    scheduler_config,
    snr,
    training_target,
)
from nas.train.config import load_config

T = 1000


def cosine_alphas_cumprod(steps: int = T) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17 with s = 0.008 and betas capped at 0.999, in float64."""

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


def zero_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so it ends at 0."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    return ((s - last) * first / (first - last)) ** 2


def test_scaled_linear_betas_are_sd15():
    scheduler = noise_scheduler(
        Recipe(schedule="scaled_linear", zero_terminal_snr=False, prediction="epsilon")
    )
    expected = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.betas.double(), expected, rtol=1e-5, atol=1e-8)


def test_cosine_schedule_matches_closed_form():
    scheduler = noise_scheduler(Recipe(zero_terminal_snr=False))
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), cosine_alphas_cumprod(), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_betas(schedule):
    plain = noise_scheduler(Recipe(schedule=schedule, zero_terminal_snr=False)).alphas_cumprod.double()
    rescaled = noise_scheduler(Recipe(schedule=schedule, zero_terminal_snr=True)).alphas_cumprod.double()
    assert plain[-1] > 0  # every plain schedule leaves signal at the last step ...
    assert rescaled[-1] == 0  # ... zero SNR removes it exactly
    assert rescaled[0] == pytest.approx(plain[0].item(), rel=1e-6)  # first step unchanged
    torch.testing.assert_close(rescaled, zero_snr(plain), rtol=1e-4, atol=1e-7)
    assert torch.all(rescaled[1:] < rescaled[:-1])  # still strictly decreasing


def test_min_snr_weights_closed_form():
    s = torch.tensor([0.0, 0.5, 5.0, 20.0, 1e4])
    eps = min_snr_weights(s, 5.0, "epsilon")
    v = min_snr_weights(s, 5.0, "v_prediction")
    # epsilon: min(SNR, 5) / SNR, with the SNR -> 0 limit 1 at SNR = 0
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 1.0, 0.25, 5e-4]))
    # v: min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(v, torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21, 5 / 10001]))
    torch.testing.assert_close(min_snr_weights(s, None, "epsilon"), torch.ones(5))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero", [False, True])
def test_min_snr_weights_from_scheduler(prediction, zero):
    scheduler = noise_scheduler(Recipe(prediction=prediction, zero_terminal_snr=zero))
    t = torch.arange(T)
    a = scheduler.alphas_cumprod.double()
    ratio = a / (1 - a)
    torch.testing.assert_close(snr(scheduler, t).double(), ratio, rtol=1e-4, atol=0)
    expected = torch.clamp(ratio, max=5) / (ratio if prediction == "epsilon" else ratio + 1)
    if prediction == "epsilon" and zero:
        expected[-1] = 1.0  # 0/0 in the formula; its limit
    weights = loss_weights(scheduler, t, 5.0)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)


def test_naive_epsilon_weight_is_nan_at_zero_snr():
    """Why the handling exists: the textbook form divides 0 by 0 at the last zero-SNR step."""
    scheduler = noise_scheduler(Recipe(prediction="epsilon", zero_terminal_snr=True))
    last = snr(scheduler, torch.tensor([T - 1]))
    assert last.item() == 0
    assert torch.isnan(torch.clamp(last, max=5.0) / last).all()
    assert loss_weights(scheduler, torch.tensor([T - 1]), 5.0).item() == 1.0


def test_velocity_target_closed_form():
    scheduler = noise_scheduler(Recipe())  # cosine, zero SNR, v
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, T - 1])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        training_target(scheduler, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0
    )
    # At the zero-SNR end the input is pure noise and v = -x0: the model must predict the mean image.
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t)[2], noise[2])
    torch.testing.assert_close(training_target(scheduler, x0, noise, t)[2], -x0[2])
    eps_scheduler = noise_scheduler(Recipe(prediction="epsilon"))
    assert training_target(eps_scheduler, x0, noise, t) is noise


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_loss_is_weighted_mse_and_finite_at_the_last_step(prediction):
    scheduler = noise_scheduler(Recipe(prediction=prediction))
    zero_model = lambda x, t, encoder_hidden_states: SimpleNamespace(sample=torch.zeros_like(x))  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, T - 1])
    losses = diffusion_loss(zero_model, scheduler, x0, torch.zeros(2, 3, 5), noise, t, gamma=5.0)
    target = training_target(scheduler, x0, noise, t)
    expected = target.pow(2).flatten(1).mean(1) * loss_weights(scheduler, t, 5.0)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, expected)


@pytest.mark.parametrize("preset", ["decidiffusion", "sd15"])
def test_scheduler_config_serves_the_samplers(preset):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    recipe = load_config(preset).diffusion
    config = scheduler_config(recipe)
    for cls in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        sampler = cls.from_config(config)
        assert sampler.config.prediction_type == recipe.prediction
        assert sampler.config.beta_schedule == recipe.schedule
        assert sampler.config.timestep_spacing == recipe.timestep_spacing
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(10)
    if preset == "decidiffusion":  # trailing: starts at the pure-noise step, never evaluates t=0
        assert ddim.timesteps[0] == T - 1 and ddim.timesteps[-1] > 0
        assert ddim.alphas_cumprod[-1] == 0
    else:  # SD 1.5: leading with offset 1
        assert ddim.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
