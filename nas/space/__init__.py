"""Search spaces and architectures as data: YAML -> validated schema -> diffusers config -> model."""

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
