"""Find and load a saved U-Net, whatever folder holds it: a `nas train` run folder, a diffusers U-Net
folder (config.json + *.safetensors) or a pipeline folder with unet/. The one name -> class table of
the U-Net classes this project builds or loads lives here too.

Weights are read from safetensors only: nothing a user hands us is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nas.core.errors import NasError
from nas.core.runfolder import ARCH, CHECKPOINTS, CONFIG, FINAL

STOCK = "UNet2DConditionModel"  # diffusers' class, wherever it can express the architecture
FLEX = "FlexUNet2DConditionModel"  # nas/models/flex_unet.py: per-layer attention depths, etc.

WEIGHTS = ("auto", "ema", "raw")  # auto: EMA weights where the run has them, else the raw weights
WEIGHT_FOLDERS = {"ema": f"{FINAL}/unet_ema", "raw": f"{FINAL}/unet"}  # in a run folder


def unet_class(class_name: str):
    """The one name -> class table for U-Net classes this project builds or loads (KeyError else)."""
    from diffusers import UNet2DConditionModel

    from nas.models.flex_unet import FlexUNet2DConditionModel

    table = {STOCK: UNet2DConditionModel, FLEX: FlexUNet2DConditionModel}
    return table[class_name]


def weights_folder(run: Path, weights: str = "auto") -> tuple[str, Path]:
    """('ema' | 'raw', folder) of the U-Net weights of a run folder; NasError if the run has none."""
    if weights not in WEIGHTS:
        raise NasError(f"--weights {weights!r}: allowed {', '.join(WEIGHTS)}")
    order = ["ema", "raw"] if weights == "auto" else [weights]
    for kind in order:
        folder = run / WEIGHT_FOLDERS[kind]
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return kind, folder
    if weights == "ema" and (run / WEIGHT_FOLDERS["raw"]).is_dir():
        raise NasError(f"{run}: no EMA weights ({WEIGHT_FOLDERS['ema']}/; trained with ema: null?); "
                       "use --weights raw")  # fmt: skip
    hint = (
        " (training did not finish: resume it with `nas train ... --resume`)"
        if (run / CHECKPOINTS).is_dir()
        else ""
    )
    wanted = " or ".join(f"{WEIGHT_FOLDERS[k]}/" for k in order)
    raise NasError(f"{run}: no U-Net weights: {wanted} with config.json and *.safetensors is missing{hint}")


@dataclass(frozen=True)
class FoundUNet:
    """Where a U-Net's weights are, and what kind of folder the user named."""

    folder: Path  # holds config.json and *.safetensors
    kind: str  # "run (ema weights)", "run (raw weights)", "diffusers folder" or "pipeline folder"
    run: Path | None  # the run folder, when the user named one (its config.yaml and arch.yaml)


def find_unet(path: str | Path, what: str = "U-Net") -> FoundUNet:
    """Locate the U-Net in a run, diffusers U-Net or pipeline folder; one-line NasError naming `what`."""
    path = Path(path)
    if not path.exists():
        raise NasError(f"{path}: {what} folder not found")
    if not path.is_dir():
        raise NasError(f"{path}: {what} must be a folder (run, U-Net or pipeline folder)")
    if (path / CONFIG).is_file() and not (path / "config.json").is_file():  # a `nas train` run
        kind, folder = weights_folder(path, "auto")
        return FoundUNet(folder, f"run ({kind} weights)", path)
    for folder, kind in ((path, "diffusers folder"), (path / "unet", "pipeline folder")):
        if (folder / "config.json").is_file():
            if not any(folder.glob("*.safetensors")):
                raise NasError(f"{folder}: no *.safetensors weights (only safetensors are read)")
            return FoundUNet(folder, kind, None)
    raise NasError(f"{path}: no U-Net in the {what} folder (expected a `nas train` run folder, a "
                   "diffusers U-Net folder with config.json and *.safetensors, or a pipeline folder with unet/)")  # fmt: skip


def load_unet(folder: Path):
    """A U-Net saved with save_pretrained (safetensors only; never unpickles), in eval mode."""
    config_file = folder / "config.json"
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise NasError(f"{config_file}: not a JSON object") from None
    try:
        cls = unet_class(class_name)
    except KeyError:
        raise NasError(f"{config_file}: _class_name {class_name!r} is not a U-Net class of nas "
                       f"(allowed: {STOCK}, {FLEX})") from None  # fmt: skip
    try:
        unet = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NasError(f"{folder}: cannot load the U-Net ({first})") from None
    return unet.eval().requires_grad_(False)


def load_base_unet(run: str | Path, like, key: str):
    """(weights kind, folder, U-Net) of the trained run an add-on builds on (`lora.init_from`,
    `controlnet.init_from`: `key`); one-line NasError when its U-Net is not of `like`'s class."""
    run = Path(run)
    kind, folder = weights_folder(run, "auto")
    unet = load_unet(folder)
    if type(unet) is not type(like):
        raise NasError(f"{key} {run}: its U-Net is a {type(unet).__name__}, the architecture builds a "
                       f"{type(like).__name__}; leave --arch out (the run's {ARCH} is used)")  # fmt: skip
    return kind, folder, unet


def base_arch(run: str | Path, key: str) -> Path:
    """The architecture file (RUN/arch.yaml) of the trained run an add-on builds on (`key`)."""
    arch = Path(run) / ARCH
    if not arch.is_file():
        raise NasError(f"{key} {run}: no {ARCH} (expected the run folder of `nas train`)")
    return arch
