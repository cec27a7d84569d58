"""Diffusers-native model classes of this project, and shipping their code with saved models."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from nas.models.flex_controlnet import FlexControlNetModel
from nas.models.flex_unet import FlexUNet2DConditionModel

# Classes whose source file is copied into the folders they are saved to, so that diffusers loads
# those folders without `nas` (trust_remote_code). Each file must import only torch and diffusers
# (tests/models/test_remote_code.py checks) and sibling files by relative imports (copied too: diffusers
# loads those beside the module); the file name, less ".py", is what config.json's `auto_map` and
# model_index.json name.
SHIPPED = {"FlexUNet2DConditionModel": FlexUNet2DConditionModel, "FlexControlNetModel": FlexControlNetModel}
RELATIVE_IMPORT = re.compile(r"^from \.(\w+) import ", re.MULTILINE)


def ship_code(cls: type, folder: str | Path) -> str | None:
    """Copy the source file of a class of `SHIPPED` into `folder`; return its module name (the file
    name less ".py"), or None for any other class (diffusers' own need no code)."""
    if SHIPPED.get(cls.__name__) is not cls:
        return None
    source = Path(sys.modules[cls.__module__].__file__ or "")
    shutil.copyfile(source, Path(folder) / source.name)
    for sibling in RELATIVE_IMPORT.findall(source.read_text()):
        shutil.copyfile(source.with_name(f"{sibling}.py"), Path(folder) / f"{sibling}.py")
    return source.stem


__all__ = ["SHIPPED", "FlexControlNetModel", "FlexUNet2DConditionModel", "ship_code"]
