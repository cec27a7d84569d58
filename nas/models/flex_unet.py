"""`FlexUNet2DConditionModel`: a diffusers-native text-conditioned U-Net whose blocks choose their
ResNet and transformer counts independently (DeciDiffusion's U-Net-NAS), which the stock
`UNet2DConditionModel` cannot express (it pairs one transformer with every ResNet).

Built only from diffusers' own blocks (`ResnetBlock2D`, `Transformer2DModel`, `Downsample2D`,
`Upsample2D`, `Timesteps`, `TimestepEmbedding`), wired the way the stock class wires them and under
the stock module names (`down_blocks.{i}.resnets.{j}`, `.attentions.{j}`, `.downsamplers.0`,
`mid_block`, `up_blocks`, ...). So for a point the stock class can express, a stock model's
`state_dict()` loads into this class with `load_state_dict(..., strict=True)`, no key mapping, and
both compute the same output (tested in tests/models/test_models.py). It saves and loads with
`save_pretrained` / `from_pretrained` and has the stock forward signature, so diffusers pipelines
accept it.

This file imports only torch and diffusers: `nas` copies it, unchanged, into every folder it saves
a model of this class to (nas/models/__init__.py, `ship_code`), and the class is registered for
diffusers' `AutoModel` (config.json gets `"auto_map": {"AutoModel": "flex_unet.FlexUNet2DConditionModel"}`),
so `diffusers.AutoModel.from_pretrained(FOLDER, trust_remote_code=True)` loads such a folder on a
machine without `nas`.

Two options reproduce DeciDiffusion 1.0's U-Net-NAS (Deci's flexible_unet, published with the model
at huggingface.co/Deci/DeciDiffusion-v1-0): `single_layer_transformers` builds a depth d after a
ResNet as d single-layer `Transformer2DModel`s (each with its own GroupNorm and proj_in/proj_out),
and `mid_block_half_resolution` gives the last down block a downsampler (its output is no skip)
and the mid block an upsampler, so the mid block works one resolution lower. Deci's mid block
forward runs its first ResNet twice (it applies `modules_list[0]` and then loops over the whole
list); that repeat is not reproduced: it adds compute, no weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin, UNet2DConditionLoadersMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from torch import nn

try:  # diffusers >= 0.35: attn_processors / set_attn_processor, as UNet2DConditionModel has them
    from diffusers.models.attention import AttentionMixin
except ImportError:  # older diffusers: no attention-processor API on this class (LoRA still works)

    class AttentionMixin:  # type: ignore[no-redef]
        pass


class FlexBlock(nn.Module):
    """ResNets, each optionally followed by a transformer of its own depth; then a resampler.

    `skip_channels` lists, per ResNet, the channels of the skip tensor concatenated to its input
    (up path) or is None (down path and mid block). `single_layer`: a depth d is d transformers of
    one layer each instead of one of d layers. `resampled_skip`: the downsampler's output is kept as
    a skip (every down block but a last one feeding a half-resolution mid block).
    """

    _gradient_checkpointing_func: Callable[..., Any]  # set by ModelMixin.enable_gradient_checkpointing

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        depths: list[int],
        temb_channels: int,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        eps: float,
        use_linear_projection: bool,
        skip_channels: list[int] | None = None,
        resample: str | None = None,  # "down", "up" or None
        single_layer: bool = False,
        resampled_skip: bool = True,
    ):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.attention_after: list[list[int]] = []  # indices into self.attentions, per ResNet
        self.resampled_skip = resampled_skip
        for i, depth in enumerate(depths):
            res_in = in_channels if i == 0 else out_channels
            if skip_channels is not None:
                res_in += skip_channels[i]
            self.resnets.append(
                ResnetBlock2D(
                    in_channels=res_in,
                    out_channels=out_channels,
                    temb_channels=temb_channels,
                    eps=eps,
                    groups=groups,
                )
            )
            layers = [1] * depth if single_layer else [depth] if depth else []
            self.attention_after.append(list(range(len(self.attentions), len(self.attentions) + len(layers))))
            for num_layers in layers:
                self.attentions.append(
                    Transformer2DModel(
                        heads,
                        out_channels // heads,
                        in_channels=out_channels,
                        num_layers=num_layers,
                        cross_attention_dim=cross_attention_dim,
                        norm_num_groups=groups,
                        use_linear_projection=use_linear_projection,
                    )
                )
        self.downsamplers = self.upsamplers = None
        if resample == "down":
            self.downsamplers = nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=1, name="op")]
            )
        elif resample == "up":
            self.upsamplers = nn.ModuleList(
                [Upsample2D(out_channels, use_conv=True, out_channels=out_channels)]
            )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        skips: list[torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output and, on the down path, every intermediate kept as a skip."""
        outputs = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                hidden_states = torch.cat([hidden_states, skips.pop()], dim=1)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(resnet, hidden_states, temb)
            else:
                hidden_states = resnet(hidden_states, temb)
            for k in self.attention_after[i]:
                hidden_states = self.attentions[k](
                    hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    return_dict=False,
                    **(attention_kwargs or {}),
                )[0]
            outputs.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            if self.resampled_skip:
                outputs.append(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states, outputs


def block_args(temb_channels: int, cross_attention_dim: int, groups: int, eps: float,
               use_linear_projection: bool, single_layer: bool) -> dict[str, Any]:  # fmt: skip
    """The FlexBlock arguments every block of one U-Net shares."""
    return dict(temb_channels=temb_channels, cross_attention_dim=cross_attention_dim, groups=groups, eps=eps,
                use_linear_projection=use_linear_projection, single_layer=single_layer)  # fmt: skip


def encoder(
    block_out_channels, down_attention, down_resnets, attention_heads, mid_attention,
    mid_block_half_resolution: bool, common: dict[str, Any],
) -> tuple[nn.ModuleList, list[int], FlexBlock | None]:  # fmt: skip
    """The down path and mid block, built alike by the U-Net and its ControlNet (flex_controlnet.py):
    (down blocks, the channels of every skip tensor, conv_in's first; the mid block or None)."""
    levels = len(block_out_channels)
    skip_channels = [block_out_channels[0]]  # conv_in output is the first skip
    down_blocks = nn.ModuleList()
    prev = block_out_channels[0]
    for i, out in enumerate(block_out_channels):
        last = i == levels - 1
        down_blocks.append(
            FlexBlock(
                prev,
                out,
                list(down_attention[i]),
                heads=attention_heads[i],
                resample="down" if not last or mid_block_half_resolution else None,
                resampled_skip=not last,  # the last one's goes to the mid block only
                **common,
            )
        )
        skip_channels += [out] * (down_resnets[i] + (0 if last else 1))
        prev = out
    mid_block = None
    if mid_attention is not None:
        mid_block = FlexBlock(
            prev,
            prev,
            list(mid_attention),
            heads=attention_heads[-1],
            resample="up" if mid_block_half_resolution else None,
            **common,
        )
    return down_blocks, skip_channels, mid_block


# diffusers' ModelMixin and ConfigMixin annotate `config_name` differently; every diffusers model has both.
class FlexUNet2DConditionModel(  # type: ignore[misc]
    ModelMixin, AttentionMixin, ConfigMixin, UNet2DConditionLoadersMixin, PeftAdapterMixin
):
    """Text-conditioned U-Net with per-block ResNet and transformer counts chosen independently.

    Per-level lists are ordered highest resolution first. `down_attention[i]` gives one transformer
    depth per down ResNet of level i (0 = no transformer after it); `up_attention[i]` one per up
    ResNet (level i has `down_resnets[i] + 1` up ResNets: one per skip at that resolution);
    `mid_attention` one per mid ResNet, or None for no mid block. `single_layer_transformers` and
    `mid_block_half_resolution`: see the module doc (DeciDiffusion's U-Net-NAS).

    Adapters: the mixins of diffusers' `UNet2DConditionModel` (models/unets/unet_2d_condition.py)
    but `FromOriginalModelMixin`, whose single-file checkpoints map SD's original layout onto the
    stock class only. So `add_adapter(LoraConfig(...))`, `load_lora_adapter`, `set_adapters`,
    `fuse_lora`, `unload_lora` (with the `peft` package) and pipelines' `load_lora_weights` work as
    on the stock class; the module names are the stock ones, so LoRA keys read the same.
    """

    _supports_gradient_checkpointing = True
    # as UNet2DConditionModel: modules kept whole by device maps, norms kept in the compute dtype
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D"]  # type: ignore[assignment]
    _skip_layerwise_casting_patterns = ["norm"]  # type: ignore[assignment]

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # `auto_map` is written by register_for_auto_class (below) for AutoModel, not an __init__
        # argument; dropped here so that loading does not warn that it "will be ignored".
        config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,  # latent height/width
        in_channels: int = 4,  # VAE latent channels
        out_channels: int = 4,
        block_out_channels: tuple[int, ...] = (320, 640, 1280),
        down_resnets: tuple[int, ...] = (2, 2, 1),
        down_attention: tuple[tuple[int, ...], ...] = ((0, 0), (1, 0), (2, 1)),
        up_attention: tuple[tuple[int, ...], ...] = ((0, 0, 0), (1, 1, 1), (2, 2, 2)),
        mid_attention: tuple[int, ...] | None = (1, 1, 0, 0),
        attention_heads: tuple[int, ...] = (8, 8, 8),  # heads per level (head size = channels // heads)
        cross_attention_dim: int = 768,  # text encoder hidden size
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        use_linear_projection: bool = False,
        flip_sin_to_cos: bool = True,  # SD's timestep embedding convention
        freq_shift: int = 0,
        # width of the guidance-scale embedding added to the timestep features (diffusers' name; LCM:
        # 256); None: no guidance embedding. Forward takes it as `timestep_cond` ([B, this width])
        time_cond_proj_dim: int | None = None,
        single_layer_transformers: bool = False,  # depth d = d one-layer transformers (DeciDiffusion)
        mid_block_half_resolution: bool = False,  # mid block one resolution lower (DeciDiffusion)
    ):
        super().__init__()
        levels = len(block_out_channels)
        for name, value in (
            ("down_resnets", down_resnets),
            ("down_attention", down_attention),
            ("up_attention", up_attention),
            ("attention_heads", attention_heads),
        ):
            if len(value) != levels:
                raise ValueError(f"{name} needs one entry per level ({levels}), got {len(value)}")
        for i in range(levels):
            if len(down_attention[i]) != down_resnets[i] or len(up_attention[i]) != down_resnets[i] + 1:
                raise ValueError(
                    f"level {i}: need {down_resnets[i]} down and {down_resnets[i] + 1} up depths"
                )
        if mid_block_half_resolution and mid_attention is None:
            raise ValueError("mid_block_half_resolution needs a mid block (mid_attention)")

        c0 = block_out_channels[0]
        temb_channels = c0 * 4  # SD: time embedding width = 4 x first level channels
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
        # cond_proj (a bias-free Linear, time_cond_proj_dim -> c0) adds `timestep_cond` to the
        # sinusoidal timestep features, as in the stock class
        self.time_embedding = TimestepEmbedding(
            c0, temb_channels, act_fn="silu", cond_proj_dim=time_cond_proj_dim
        )
        common = block_args(temb_channels, cross_attention_dim, norm_num_groups, norm_eps,
                            use_linear_projection, single_layer_transformers)  # fmt: skip
        self.down_blocks, skip_channels, self.mid_block = encoder(
            block_out_channels, down_attention, down_resnets, attention_heads, mid_attention,
            mid_block_half_resolution, common,
        )  # fmt: skip
        prev = block_out_channels[-1]  # the up path starts at the innermost width

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            out = block_out_channels[i]
            n = down_resnets[i] + 1
            skips = [skip_channels.pop() for _ in range(n)]
            self.up_blocks.append(
                FlexBlock(
                    prev,
                    out,
                    list(up_attention[i]),
                    heads=attention_heads[i],
                    skip_channels=skips,
                    resample=None if i == 0 else "up",
                    **common,
                )
            )
            prev = out

        self.conv_norm_out = nn.GroupNorm(num_channels=c0, num_groups=norm_num_groups, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(c0, out_channels, kernel_size=3, padding=1)

    def _time_embedding(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(sample.shape[0])
        if timestep_cond is not None and self.time_embedding.cond_proj is None:
            raise ValueError(
                "timestep_cond given, but this U-Net has no time_cond_proj_dim (guidance embedding)"
            )
        return self.time_embedding(self.time_proj(timestep).to(dtype=sample.dtype), timestep_cond)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        """Same signature as `UNet2DConditionModel.forward`; class labels, extra embeddings and
        T2I-adapter residuals are not supported (ControlNet residuals are). `timestep_cond` (with
        `time_cond_proj_dim`): an embedding added to the timestep features, e.g. LCM's guidance-scale
        embedding, so a guidance-distilled U-Net needs one call per step."""
        if class_labels is not None or added_cond_kwargs or down_intrablock_additional_residuals is not None:
            raise ValueError(
                "FlexUNet2DConditionModel supports no class labels, added embeddings or T2I adapters"
            )
        # A LoRA's scale rides in cross_attention_kwargs["scale"] (pipelines' `cross_attention_kwargs=
        # {"scale": s}`); it scales the PEFT layers for this call, as the stock class's forward does.
        lora_scale = 1.0
        if cross_attention_kwargs and "scale" in cross_attention_kwargs:
            cross_attention_kwargs = dict(cross_attention_kwargs)
            lora_scale = float(cross_attention_kwargs.pop("scale"))
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        try:
            out = self._unet(
                sample,
                timestep,
                encoder_hidden_states,
                timestep_cond,
                attention_mask,
                cross_attention_kwargs,
                down_block_additional_residuals,
                mid_block_additional_residual,
                encoder_attention_mask,
            )
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, lora_scale)
        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out)

    def _unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cross_attention_kwargs: dict[str, Any] | None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None,
        mid_block_additional_residual: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attention_kwargs: dict[str, Any] = {}
        if cross_attention_kwargs:
            attention_kwargs["cross_attention_kwargs"] = cross_attention_kwargs
        if attention_mask is not None:  # (1 keep, 0 drop) -> additive bias, as the stock class does
            attention_kwargs["attention_mask"] = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(
                1
            )
        if encoder_attention_mask is not None:
            bias = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
            attention_kwargs["encoder_attention_mask"] = bias.unsqueeze(1)

        emb = self._time_embedding(sample, timestep, timestep_cond)
        hidden = self.conv_in(sample)
        skips = [hidden]
        for block in self.down_blocks:
            hidden, outputs = block(hidden, emb, encoder_hidden_states, attention_kwargs=attention_kwargs)
            skips += outputs
        if down_block_additional_residuals is not None:  # ControlNet
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        if self.mid_block is not None:
            hidden, _ = self.mid_block(hidden, emb, encoder_hidden_states, attention_kwargs=attention_kwargs)
        if mid_block_additional_residual is not None:
            hidden = hidden + mid_block_additional_residual
        for block in self.up_blocks:
            hidden, _ = block(
                hidden, emb, encoder_hidden_states, skips=skips, attention_kwargs=attention_kwargs
            )
        return self.conv_out(self.conv_act(self.conv_norm_out(hidden)))


# save_pretrained / save_config write config.json's `auto_map` entry, naming this file's module
# (diffusers >= 0.36; older releases lack it and load the folder only with nas installed)
if hasattr(FlexUNet2DConditionModel, "register_for_auto_class"):
    FlexUNet2DConditionModel.register_for_auto_class("AutoModel")
