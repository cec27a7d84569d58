"""Zero-cost proxies: score an untrained U-Net from one batch, in a second, before any training.

Each is a function `(model, batch, loss_fn) -> float`, higher = predicted better, registered in
`PROXIES`. From the NAS literature: grad-norm and SNIP (Abdelfattah et al. 2021, "Zero-cost proxies
for lightweight NAS"; SNIP: Lee et al. 2019), synflow (Tanaka et al. 2020). They are weak on some
spaces: a proxy is only worth using where it beats #params / MACs (ZiCo, Li et al. 2023), which
`experiments/studies/proxy_fidelity.py` measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def grad_norm(model: torch.nn.Module, batch: dict, loss_fn: Callable) -> float:
    """L2 norm of the loss gradient over all weights."""
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).mean().backward()
    return math.sqrt(float(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)))


def snip(model: torch.nn.Module, batch: dict, loss_fn: Callable) -> float:
    """Sum over weights of |w * dL/dw|: the loss change if each weight were removed."""
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).mean().backward()
    return float(sum((p.detach() * p.grad).abs().sum() for p in model.parameters() if p.grad is not None))


@torch.no_grad()
def _sign_and_abs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    signs = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            signs[name] = torch.sign(tensor)
            tensor.abs_()
    return signs


def synflow(model: torch.nn.Module, batch: dict, loss_fn: Callable) -> float:
    """Data-free: with all weights made positive and an all-ones input, sum of |w * dR/dw| where R
    is the summed output (computed in float64 to avoid overflow on deep nets)."""
    model = model.double()
    signs = _sign_and_abs(model)
    model.zero_grad(set_to_none=True)
    latents = torch.ones_like(batch["latents"], dtype=torch.float64)
    text = torch.ones_like(batch["text"], dtype=torch.float64)
    model(latents, batch["timesteps"], encoder_hidden_states=text).sample.sum().backward()
    score = float(sum((p.detach() * p.grad).abs().sum() for p in model.parameters() if p.grad is not None))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in signs:
                tensor.mul_(signs[name])
    model.float()
    return score


PROXIES: dict[str, Callable[[torch.nn.Module, dict, Callable], float]] = {
    "grad_norm": grad_norm,
    "snip": snip,
    "synflow": synflow,
}


def zero_cost_score(name: str, arch, cache, recipe_config, batch_size: int = 8, seed: int = 0) -> float:
    """Score `arch` (freshly initialised with `seed`) on the first training batch of `cache`."""
    from nas.diffusion import diffusion_loss, noise_scheduler
    from nas.space import build_unet
    from nas.train.data import Batches

    if name not in PROXIES:
        raise KeyError(f"unknown zero-cost proxy {name!r} (allowed: {', '.join(PROXIES)})")
    torch.manual_seed(seed)
    model = build_unet(arch)
    scheduler = noise_scheduler(recipe_config.diffusion)
    config = recipe_config.model_copy(update={"batch_size": batch_size, "cfg_drop": 0.0})
    batch = Batches(cache, config, scheduler.config.num_train_timesteps).get(0, 0)
    gamma = recipe_config.diffusion.min_snr_gamma

    def loss_fn(net, b):
        return diffusion_loss(net, scheduler, b["latents"], b["text"], b["noise"], b["timesteps"], gamma)

    return PROXIES[name](model, batch, loss_fn)
