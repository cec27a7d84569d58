"""Search spaces and architectures as data: YAML -> validated schema -> diffusers config -> model.

The names below load on first use (PEP 562), so `import nas.space.schema` stays data only: no
torch, no diffusers. `from nas.space import build_unet` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module of nas.space that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "FLEX",
            "STOCK",
            "arch_from_dict",
            "build_unet",
            "flex_config",
            "load_arch",
            "spread",
            "stock_config",
            "unet_class",
            "unet_config",
        ],
        "build",
    ),
    **dict.fromkeys(
        [
            "FixedChoices",
            "RandomChoices",
            "arch_to_params",
            "canonical",
            "extreme_archs",
            "load_space",
            "mirrored_up_attentions",
            "sample_arch",
            "space_size",
        ],
        "sample",
    ),
    **dict.fromkeys(["Arch", "ArchLevel", "ArchMid", "Settings", "Space"], "schema"),
}
__all__ = [
    "FLEX",
    "STOCK",
    "Arch",
    "ArchLevel",
    "ArchMid",
    "FixedChoices",
    "RandomChoices",
    "Settings",
    "Space",
    "arch_from_dict",
    "arch_to_params",
    "build_unet",
    "canonical",
    "extreme_archs",
    "flex_config",
    "load_arch",
    "load_space",
    "mirrored_up_attentions",
    "sample_arch",
    "space_size",
    "spread",
    "stock_config",
    "unet_class",
    "unet_config",
]
assert set(_EXPORTS) == set(__all__), "every lazy name is public"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nas.space' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nas.space.{_EXPORTS[name]}"), name)


if TYPE_CHECKING:  # the type checker sees the names as plain imports
    from nas.space.build import (
        FLEX,
        STOCK,
        arch_from_dict,
        build_unet,
        flex_config,
        load_arch,
        spread,
        stock_config,
        unet_class,
        unet_config,
    )
    from nas.space.sample import (
        FixedChoices,
        RandomChoices,
        arch_to_params,
        canonical,
        extreme_archs,
        load_space,
        mirrored_up_attentions,
        sample_arch,
        space_size,
    )
    from nas.space.schema import Arch, ArchLevel, ArchMid, Settings, Space
