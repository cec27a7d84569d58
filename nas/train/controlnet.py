"""ControlNet training of a trained run (`controlnet:` in the training config), through the one
training loop (nas/train/loop.py).

As diffusers' examples/controlnet/train_controlnet.py: the run's U-Net is loaded and frozen, a
ControlNet is made from it (`controlnet_for`: diffusers' `ControlNetModel.from_unet` for the stock
class, `FlexControlNetModel.from_unet` for the flex class: copied encoder and mid block, zero output
convolutions), and only the ControlNet trains, on the U-Net's diffusion loss with the ControlNet's
residuals added to the U-Net's skips and mid block; no EMA. The condition image of each cached item
is re-drawn from its shapes record (nas/data/conditions.py), in [0, 1] as the pipeline feeds it.

The trained model is `ControlledUNet` (the frozen U-Net beside the ControlNet), so checkpoints and
resume are the loop's own; at the end only the ControlNet is saved: RUN/controlnet/, a diffusers
ControlNet folder (safetensors; a flex ControlNet's folder ships its code), and RUN/controlnet.json.
`nas train` then writes the folder's model card (nas/sample/card.py).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nas.core.runfolder import staged_folder, write_json
from nas.diffusion import diffusion_loss
from nas.models import ship_code
from nas.models.load import load_base_unet
from nas.train.config import TrainConfig
from nas.train.data import Batches, ValidationSet, split

CONTROLNET_DIR = "controlnet"  # RUN/controlnet: the diffusers ControlNet folder
CONTROLNET_INFO = "controlnet.json"


class ControlledUNet(torch.nn.Module):
    """A frozen U-Net steered by a trainable ControlNet: forward(sample, t, encoder_hidden_states,
    controlnet_cond) is the U-Net's output with the ControlNet's residuals (without a condition: the
    bare U-Net)."""

    def __init__(self, unet, controlnet, info: dict):
        super().__init__()
        self.unet = unet.requires_grad_(False)
        self.controlnet = controlnet
        self.config = unet.config  # what check_compatible reads (latent channels, text width, size)
        self.info = info  # recorded in RUN/controlnet.json

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond=None, **kwargs):
        if controlnet_cond is None:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond.to(sample.dtype), return_dict=False,
        )  # fmt: skip
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs,
        )  # fmt: skip

    def enable_gradient_checkpointing(self) -> None:  # both, as train_controlnet.py does
        self.unet.enable_gradient_checkpointing()
        self.controlnet.enable_gradient_checkpointing()

    def save_final(self, run: Path, ema=None) -> None:
        """RUN/controlnet (save_pretrained, safetensors, the flex class's code) and RUN/controlnet.json."""
        with staged_folder(Path(run) / CONTROLNET_DIR) as staging:
            self.controlnet.save_pretrained(staging, safe_serialization=True)
            ship_code(type(self.controlnet), staging)
        trainable = sum(p.numel() for p in self.controlnet.parameters())
        base = sum(p.numel() for p in self.unet.parameters())
        write_json(Path(run) / CONTROLNET_INFO, {**self.info, "folder": CONTROLNET_DIR,
                   "controlnet_class": type(self.controlnet).__name__, "controlnet_params": trainable,
                   "unet_params": base, "params_ratio": trainable / base})  # fmt: skip


def with_controlnet(model, config: TrainConfig, cache, quiet: bool = False):
    """`model` unchanged without `controlnet:`; else a ControlledUNet of controlnet.init_from's U-Net
    (its final weights, EMA where it has them) and a new ControlNet made from it."""
    from nas.data.conditions import CacheConditions
    from nas.models.controlnet import controlnet_for

    control = config.controlnet
    if control is None:
        return model
    run = Path(control.init_from)
    kind, _, unet = load_base_unet(run, model, "controlnet.init_from")
    conditions = CacheConditions(cache, control.condition)  # a cache without a condition source: here
    factor = conditions.size // int(unet.config.sample_size)
    controlnet = controlnet_for(unet, factor)
    controlnet.train()
    info = {"init_from": str(run), "base_weights": kind, "base_unet_class": type(unet).__name__,
            "condition": control.condition, "dataset_seed": conditions.seed, "resolution": conditions.size}  # fmt: skip
    if not quiet:
        trained = sum(p.numel() for p in controlnet.parameters())
        print(f"ControlNet ({control.condition}) on {run} ({kind} weights): {trained:,} parameters trained, "
              f"the U-Net's {sum(p.numel() for p in unet.parameters()):,} frozen", file=sys.stderr, flush=True)  # fmt: skip
    return ControlledUNet(unet, controlnet, info)


class ControlBatches(Batches):
    """Batches with each sample's condition image ("cond" [B, 3, H, W] in [0, 1]), drawn for the
    same cache item as its latent: still a pure function of (step, micro-step)."""

    def __init__(self, cache, config, num_timesteps: int, rank: int, processes: int, conditions):
        super().__init__(cache, config, num_timesteps, rank, processes)
        self.conditions = conditions

    def get(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        batch = super().get(step, micro)
        batch["cond"] = self.conditions.stack(self.indices(step, micro))
        return batch


@dataclass
class ControlValidationSet(ValidationSet):
    """The fixed validation triples with their items' condition images."""

    item_cond: torch.Tensor | None = None  # [V, 3, H, W]

    def shard(self, rank: int, processes: int, batch_size: int):
        assert self.item_cond is not None
        mine = torch.arange(rank, len(self), processes)
        for batch, chunk in zip(super().shard(rank, processes, batch_size), mine.split(batch_size)):
            yield {**batch, "cond": self.item_cond[self.owner[chunk]]}


def training_data(cache, config: TrainConfig, num_timesteps: int, accelerator):
    """(Batches, ValidationSet) of the loop; with `controlnet:`, theirs with condition images."""
    rank, processes = accelerator.process_index, accelerator.num_processes
    if config.controlnet is None:
        return Batches(cache, config, num_timesteps, rank, processes), ValidationSet.build(
            cache, config, num_timesteps
        )
    from nas.data.conditions import CacheConditions

    conditions = CacheConditions(cache, config.controlnet.condition)
    batches = ControlBatches(cache, config, num_timesteps, rank, processes, conditions)
    plain = ValidationSet.build(cache, config, num_timesteps)
    _, held_out = split(len(cache), config.val_items, str(getattr(cache, "path", "cache")))
    val_set = ControlValidationSet(**vars(plain), item_cond=conditions.stack(held_out))
    return batches, val_set


def task_loss(model, scheduler, b: dict, gamma) -> torch.Tensor:
    """Per-sample diffusion loss of a batch; with a "cond" (ControlNet training) the U-Net is given
    the ControlNet's residuals of that condition."""
    if "cond" in b:
        model = functools.partial(model, controlnet_cond=b["cond"])
    return diffusion_loss(model, scheduler, b["latents"], b["text"], b["noise"], b["timesteps"], gamma)
