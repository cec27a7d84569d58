"""ControlNet for every U-Net nas makes: diffusers' `ControlNetModel.from_unet` for the stock class,
`FlexControlNetModel.from_unet` (nas/models/flex_controlnet.py) for the flex class; saved as diffusers
folders (safetensors; a flex ControlNet's folder ships its code), run in diffusers'
`StableDiffusionControlNetPipeline` with the run's VAE, text encoder and scheduler.

A new ControlNet: `controlnet_for` (nas/models/controlnet.py, so the trainer makes one too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nas.core.errors import NasError
from nas.models import FlexControlNetModel, ship_code
from nas.models.controlnet import conditioning_channels, controlnet_for  # noqa: F401  (re-exported)
from nas.sample.components import RunComponents

CONTROLNET_CLASSES = ("ControlNetModel", "FlexControlNetModel")
# modules a ControlNet copies from its U-Net: they must have the same shapes in both
MIRRORED_MODULES = ("conv_in", "time_embedding", "down_blocks", "mid_block")


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
    from nas.sample.generate import pipeline_parts

    pipe = StableDiffusionControlNetPipeline(
        **pipeline_parts(components, scheduler, spacing),
        controlnet=controlnet.to(components.empty_text.device),
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe


# --- --controlnet of nas sample / nas eval ------------------------------------------------------------

CONTROLNET_INFO = (
    "controlnet.json"  # written by nas/train/controlnet.py in the run folder (RUN/controlnet/..)
)
MAX_CONTROLNET_SCALE = 10.0  # |--controlnet-scale|: 1 is the trained strength (diffusers' default)


@dataclass(frozen=True)
class ControlChoice:
    """A ControlNet to sample with: its folder, the strength, the condition kind it was trained on."""

    folder: Path
    scale: float = 1.0
    condition: str | None = None  # "mask" / "edges" (RUN/controlnet.json); None: not recorded
    image: Path | None = None  # --control-image of nas sample (nas eval draws one per prompt)

    def pipeline(self, components: RunComponents, settings, count: int):
        """(the ControlNet pipeline, ([control image] * count, scale)) for `count` images of `nas sample`."""
        if self.image is None:
            raise NasError("--controlnet needs --control-image FILE (an image of the output size)")
        image = read_control_image(self.image, components.resolution)
        pipe = controlnet_pipeline(components, attach_controlnet(components, self), settings.scheduler,
                                   settings.spacing)  # fmt: skip
        return pipe, ([image] * count, self.scale)


def controlnet_folder(path: str | Path) -> Path:
    """The ControlNet folder of `--controlnet PATH`: PATH itself, or PATH/controlnet of a `controlnet:` run."""
    path = Path(path)
    if not path.is_dir():
        raise NasError(
            f"--controlnet {path}: not found (a ControlNet folder or a `controlnet:` run of nas train)"
        )
    if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"
    if not (path / "config.json").is_file():
        raise NasError(f"--controlnet {path}: not a ControlNet folder (no config.json; a `controlnet:` run of "
                       "nas train, or a folder written by save_pretrained)")  # fmt: skip
    class_name = json.loads((path / "config.json").read_text()).get("_class_name")
    if class_name not in CONTROLNET_CLASSES:
        raise NasError(f"--controlnet {path}: not a ControlNet folder (config.json's _class_name is {class_name!r}; "
                       f"allowed: {', '.join(CONTROLNET_CLASSES)})")  # fmt: skip
    return path


def controlnet_choice(
    path: str | Path | None, scale: float = 1.0, image: str | Path | None = None
) -> ControlChoice | None:
    """`--controlnet PATH --controlnet-scale S [--control-image FILE]` checked (None without --controlnet)."""
    if path is None:
        return None
    if not -MAX_CONTROLNET_SCALE <= scale <= MAX_CONTROLNET_SCALE:
        raise NasError(f"--controlnet-scale {scale}: allowed -{MAX_CONTROLNET_SCALE:g}..{MAX_CONTROLNET_SCALE:g} "
                       "(1 = as trained, 0 = none)")  # fmt: skip
    folder = controlnet_folder(path)
    info_file = folder.parent / CONTROLNET_INFO
    condition = None
    if info_file.is_file() and (folder.parent / info_file.stem).resolve() == folder.resolve():
        condition = json.loads(info_file.read_text()).get("condition")
    return ControlChoice(folder, scale, condition, None if image is None else Path(image))


def attach_controlnet(components: RunComponents, choice: ControlChoice):
    """Load the ControlNet, check it fits the run's U-Net, and name it on `components` (sidecars and
    eval.json read `components.controlnet`); returns the model."""
    from nas.core.runfolder import portable
    from nas.data.encoders import weights_sha256

    if type(components.unet).__name__ == "RuntimeUNet":
        raise NasError("--controlnet runs the U-Net eagerly: use --runtime eager --precision fp32")
    controlnet = load_controlnet(choice.folder)
    check_controlnet_fits(controlnet, components.unet, f"--controlnet {choice.folder}")
    record = {"folder": portable(choice.folder), "sha256": weights_sha256(choice.folder),
              "scale": choice.scale, "condition": choice.condition, "class": type(controlnet).__name__}  # fmt: skip
    setattr(components, "controlnet", record)  # noqa: B010  (RunComponents has no field for it)
    return controlnet.to(components.empty_text.device)


def read_control_image(path: str | Path, resolution: int):
    """`--control-image FILE` as an RGB PIL image of the output size (one-line NasError otherwise)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise NasError(
            f"--control-image {path}: cannot read the image ({str(exc).splitlines()[0]})"
        ) from None
    check_control_image(rgb, resolution, f"--control-image {path}")
    return rgb
