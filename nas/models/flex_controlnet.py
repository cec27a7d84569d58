"""`FlexControlNetModel`: a ControlNet (Zhang et al. 2023) for `FlexUNet2DConditionModel`, built the
way diffusers' `ControlNetModel.from_unet` builds one for the stock U-Net
(diffusers/models/controlnets/controlnet.py): a copy of the U-Net's input convolution, timestep
embedding, down blocks and mid block (same module names, weights copied), a conditioning embedding
of the control image (`ControlNetConditioningEmbedding`) added after `conv_in`, and one
zero-initialised 1x1 convolution per skip tensor and after the mid block, so a new ControlNet adds
nothing until trained. Its outputs are the U-Net's `down_block_additional_residuals` (one per skip,
in the flex U-Net's skip order) and `mid_block_additional_residual`.

It subclasses `ControlNetModel` (skipping that class's own __init__) so diffusers'
`StableDiffusionControlNetPipeline` takes it as a single ControlNet; forward has the same signature
and returns `ControlNetOutput`. Like flex_unet.py, this file imports only torch, diffusers and (by a
relative import) flex_unet.py, and is copied into the folders it is saved to, so
`AutoModel.from_pretrained(FOLDER, trust_remote_code=True)` loads it without `nas`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.controlnets.controlnet import (
    ControlNetConditioningEmbedding,
    ControlNetModel,
    ControlNetOutput,
    zero_module,
)
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .flex_unet import FlexUNet2DConditionModel, block_args, encoder

# The U-Net config keys a ControlNet mirrors (the encoder half and the mid block).
MIRRORED = (
    "sample_size",
    "in_channels",
    "block_out_channels",
    "down_resnets",
    "down_attention",
    "mid_attention",
    "attention_heads",
    "cross_attention_dim",
    "norm_num_groups",
    "norm_eps",
    "use_linear_projection",
    "flip_sin_to_cos",
    "freq_shift",
    "time_cond_proj_dim",
    "single_layer_transformers",
    "mid_block_half_resolution",
)


class FlexControlNetModel(ControlNetModel):
    """ControlNet of a FlexUNet2DConditionModel; the U-Net fields mean what they mean there."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):  # `auto_map` is no __init__ argument
        config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        block_out_channels: tuple[int, ...] = (320, 640, 1280),
        down_resnets: tuple[int, ...] = (2, 2, 1),
        down_attention: tuple[tuple[int, ...], ...] = ((0, 0), (1, 0), (2, 1)),
        mid_attention: tuple[int, ...] | None = (1, 1, 0, 0),
        attention_heads: tuple[int, ...] = (8, 8, 8),
        cross_attention_dim: int = 768,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        use_linear_projection: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_cond_proj_dim: int | None = None,
        single_layer_transformers: bool = False,
        mid_block_half_resolution: bool = False,
        conditioning_channels: int = 3,  # control image channels (RGB)
        # ControlNet paper: 4 convolutions, stride 2 between them, so the image is 8x the latent (SD's VAE)
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        controlnet_conditioning_channel_order: str = "rgb",
        global_pool_conditions: bool = False,  # read by StableDiffusionControlNetPipeline
    ):
        ModelMixin.__init__(self)  # not ControlNetModel.__init__: that builds the stock blocks
        c0 = block_out_channels[0]
        temb_channels = c0 * 4
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(
            c0, temb_channels, act_fn="silu", cond_proj_dim=time_cond_proj_dim
        )
        self.class_embedding = None  # type: ignore[assignment]  # ControlNetModel's attributes that the flex class does not have
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            conditioning_embedding_channels=c0,
            block_out_channels=conditioning_embedding_out_channels,
            conditioning_channels=conditioning_channels,
        )
        common = block_args(temb_channels, cross_attention_dim, norm_num_groups, norm_eps,
                            use_linear_projection, single_layer_transformers)  # fmt: skip
        self.down_blocks, skip_channels, self.mid_block = encoder(  # type: ignore[assignment]
            block_out_channels, down_attention, down_resnets, attention_heads, mid_attention,
            mid_block_half_resolution, common,
        )  # fmt: skip
        # one zero convolution per skip tensor of the U-Net (in its skip order), one after the mid block
        self.controlnet_down_blocks = nn.ModuleList(
            [zero_module(nn.Conv2d(c, c, kernel_size=1)) for c in skip_channels]
        )
        prev = block_out_channels[-1]
        self.controlnet_mid_block = zero_module(nn.Conv2d(prev, prev, kernel_size=1))
        self.gradient_checkpointing = False

    @classmethod
    def from_unet(
        cls,
        unet: FlexUNet2DConditionModel,  # type: ignore[override]
        controlnet_conditioning_channel_order: str = "rgb",
        conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
        load_weights_from_unet: bool = True,
        conditioning_channels: int = 3,
    ) -> FlexControlNetModel:
        """A ControlNet mirroring `unet` (a FlexUNet2DConditionModel), its weights copied (as diffusers'
        ControlNetModel.from_unet); the output convolutions start at zero."""
        config = {key: unet.config[key] for key in MIRRORED}
        controlnet = cls(
            **config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels or (16, 32, 96, 256),
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_proj", "time_embedding", "down_blocks"):
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
            if unet.mid_block is not None:
                controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())
        if controlnet.dtype != unet.dtype:
            controlnet.to(dtype=unet.dtype)
        return controlnet.to(unet.device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """ControlNetModel.forward's signature and outputs (class labels and added embeddings refused)."""
        if class_labels is not None or added_cond_kwargs:
            raise ValueError("FlexControlNetModel supports no class labels or added embeddings")
        if self.config["controlnet_conditioning_channel_order"] == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        attention_kwargs: dict[str, Any] = {}
        if cross_attention_kwargs:
            attention_kwargs["cross_attention_kwargs"] = cross_attention_kwargs
        if attention_mask is not None:
            bias = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_kwargs["attention_mask"] = bias.unsqueeze(1)
        emb = FlexUNet2DConditionModel._time_embedding(self, sample, timestep, timestep_cond)
        cond = self.controlnet_cond_embedding(controlnet_cond)
        if cond.shape[-2:] != sample.shape[-2:]:
            raise ValueError(
                f"control image embeds to {tuple(cond.shape[-2:])}, the latent is {tuple(sample.shape[-2:])}:"
                " the control image must be the output image's size"
            )
        hidden = self.conv_in(sample) + cond
        skips = [hidden]
        for block in self.down_blocks:
            hidden, outputs = block(hidden, emb, encoder_hidden_states, attention_kwargs=attention_kwargs)
            skips += outputs
        if self.mid_block is not None:
            hidden, _ = self.mid_block(hidden, emb, encoder_hidden_states, attention_kwargs=attention_kwargs)
        down = [conv(s) for s, conv in zip(skips, self.controlnet_down_blocks, strict=True)]
        mid = self.controlnet_mid_block(hidden)
        if guess_mode and not self.config["global_pool_conditions"]:  # as ControlNetModel: 0.1 .. 1.0
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [d * s for d, s in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if self.config["global_pool_conditions"]:
            down = [torch.mean(d, dim=(2, 3), keepdim=True) for d in down]
            mid = torch.mean(mid, dim=(2, 3), keepdim=True)
        if not return_dict:
            return (tuple(down), mid)
        return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)


if hasattr(FlexControlNetModel, "register_for_auto_class"):
    FlexControlNetModel.register_for_auto_class("AutoModel")
