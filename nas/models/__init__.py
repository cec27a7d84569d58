"""Diffusers-native model classes of this project."""

from nas.models.flex_unet import FlexUNet2DConditionModel

__all__ = ["FlexUNet2DConditionModel"]
