"""A new ControlNet for either U-Net class (`controlnet_for`): diffusers' `ControlNetModel.from_unet`
for the stock class, `FlexControlNetModel.from_unet` (flex_controlnet.py) for the flex class. Here,
below the trainer (nas/train/controlnet.py) and the sampler (nas/sample/controlnet.py), which both
make one.

The conditioning embedding (ControlNet paper: 4 convolutions, 3 of stride 2, for SD's 8x VAE) is cut to
the run's VAE: log2(VAE factor) strided convolutions, so the control image has the output image's size.
"""

from __future__ import annotations

import math

from nas.core.errors import NasError
from nas.models.flex_controlnet import FlexControlNetModel
from nas.models.flex_unet import FlexUNet2DConditionModel

SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNetModel default (SD's 8x VAE)


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Channels of the conditioning embedding for a VAE that downsamples `vae_scale_factor` times."""
    steps = int(math.log2(vae_scale_factor)) if vae_scale_factor >= 1 else 0
    if 2**steps != vae_scale_factor or steps < 1:
        raise NasError(f"VAE scale factor {vae_scale_factor}: a ControlNet needs a power of 2 (>= 2)")
    channels = SD_CONDITIONING_CHANNELS + (SD_CONDITIONING_CHANNELS[-1],) * max(0, steps - 3)
    return channels[: steps + 1]


def controlnet_for(unet, vae_scale_factor: int = 8):
    """A new ControlNet of `unet` (weights copied, output convolutions zero), stock or flex."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    channels = conditioning_channels(vae_scale_factor)
    if isinstance(unet, FlexUNet2DConditionModel):
        return FlexControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    if isinstance(unet, UNet2DConditionModel):
        if unet.config.mid_block_type is None:  # type: ignore[attr-defined]
            raise NasError("diffusers' ControlNetModel needs a mid block, and this stock U-Net has none "
                           "(mid_block_type: null); build the architecture in the flex class for a ControlNet")  # fmt: skip
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    raise NasError(f"no ControlNet for a {type(unet).__name__} (allowed: UNet2DConditionModel, {FlexUNet2DConditionModel.__name__})")  # fmt: skip
