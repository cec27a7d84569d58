"""ControlNet for every U-Net nas makes: diffusers' `ControlNetModel.from_unet` for the stock class,
`FlexControlNetModel.from_unet` (nas/models/flex_controlnet.py) for the flex class; saved as diffusers
folders (safetensors; a flex ControlNet's folder ships its code), run in diffusers'
`StableDiffusionControlNetPipeline` with the run's VAE, text encoder and scheduler.

The conditioning embedding (ControlNet paper: 4 convolutions, 3 of stride 2, for SD's 8x VAE) is cut to
the run's VAE: log2(VAE factor) strided convolutions, so the control image has the output image's size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from nas.core.errors import NasError
from nas.models import FlexControlNetModel, FlexUNet2DConditionModel, ship_code
from nas.sample.components import RunComponents, make_scheduler

SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' ControlNetModel default (SD's 8x VAE)
CONTROLNET_CLASSES = ("ControlNetModel", "FlexControlNetModel")
# modules a ControlNet copies from its U-Net: they must have the same shapes in both
MIRRORED_MODULES = ("conv_in", "time_embedding", "down_blocks", "mid_block")


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """Channels of the conditioning embedding for a VAE that downsamples `vae_scale_factor` times."""
    steps = int(math.log2(vae_scale_factor))
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


def check_controlnet_fits(controlnet, unet, where: str) -> None:
    """The ControlNet was made for this U-Net's architecture: the modules it mirrors have the U-Net's
    shapes (one-line NasError naming the first that differs)."""
    ours = {k: v.shape for k, v in unet.state_dict().items() if k.split(".")[0] in MIRRORED_MODULES}
    theirs = {k: v.shape for k, v in controlnet.state_dict().items() if k.split(".")[0] in MIRRORED_MODULES}
    for key in sorted(ours.keys() | theirs.keys()):
        if ours.get(key) != theirs.get(key):
            raise NasError(f"{where}: a ControlNet for another U-Net: {key} is {_shape(theirs.get(key))} in the "
                           f"ControlNet, {_shape(ours.get(key))} in this U-Net")  # fmt: skip


def _shape(shape) -> str:
    return "absent" if shape is None else "x".join(map(str, shape))


def save_controlnet(controlnet, folder: str | Path) -> Path:
    """save_pretrained (safetensors) and, for the flex class, its code (flex_controlnet.py, flex_unet.py)."""
    folder = Path(folder)
    controlnet.save_pretrained(folder, safe_serialization=True)
    ship_code(type(controlnet), folder)
    return folder


def load_controlnet(folder: str | Path):
    """A ControlNet folder of either class (safetensors only), in eval mode."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise NasError(
            f"--controlnet {folder}: no config.json (a ControlNet folder written by save_pretrained)"
        )
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in CONTROLNET_CLASSES:
        raise NasError(f"{config_file}: _class_name {class_name!r} is not a ControlNet (allowed: {', '.join(CONTROLNET_CLASSES)})")  # fmt: skip
    cls = FlexControlNetModel if class_name == "FlexControlNetModel" else ControlNetModel
    try:
        model = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise NasError(f"{folder}: cannot load the ControlNet ({str(exc).strip().splitlines()[0]})") from None
    return model.eval().requires_grad_(False)


def check_control_image(image, resolution: int, where: str) -> None:
    """The control image has the output size (resolution x resolution); one-line NasError otherwise."""
    width, height = (
        image.size if hasattr(image, "size") and not torch.is_tensor(image) else image.shape[-1:-3:-1]
    )
    if (width, height) != (resolution, resolution):
        raise NasError(f"{where}: control image is {width}x{height}, this run samples {resolution}x{resolution}; "
                       "give one of the output size")  # fmt: skip


def controlnet_pipeline(
    components: RunComponents, controlnet, scheduler: str = "ddim", spacing: str = "trailing"
):
    """StableDiffusionControlNetPipeline of the run's components and `controlnet` (checked against the U-Net)."""
    from diffusers import StableDiffusionControlNetPipeline

    check_controlnet_fits(controlnet, components.unet, "controlnet")
    from nas.sample.generate import pipeline_text_encoder

    te = pipeline_text_encoder(components)
    pipe = StableDiffusionControlNetPipeline(
        vae=components.vae,
        text_encoder=te.model,
        tokenizer=te.tokenizer,
        unet=components.unet,
        controlnet=controlnet.to(components.empty_text.device),
        scheduler=make_scheduler(scheduler, components.recipe, spacing),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe
