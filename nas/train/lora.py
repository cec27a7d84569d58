"""LoRA fine-tuning of a trained run (`lora:` in the training config): the run's U-Net is loaded and
frozen, a peft LoRA adapter is added to its attention projections (or `target_modules`), and only the
adapter trains, through the one training loop (nas/train/loop.py). The result is diffusers' LoRA
format: RUN/pytorch_lora_weights.safetensors, written by `StableDiffusionPipeline.save_lora_weights`
with the adapter's config as metadata, so `pipe.load_lora_weights(RUN)` loads it into the base
run's pipeline (stock or flex class), and `nas sample BASE --lora RUN` samples with it.

As diffusers' examples/text_to_image/train_text_to_image_lora.py: `init_lora_weights="gaussian"`
(A random, B zero: the adapter starts as the identity), lora_alpha = rank by default, no EMA.
RUN/lora.json records the base, the adapter's settings and the trainable parameter share.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from nas.core.errors import NasError
from nas.core.runfolder import write_json
from nas.models.load import load_base_unet, weights_folder
from nas.train.config import LoraTrainConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_INFO = "lora.json"
ADAPTER = "default"  # peft's default adapter name; load_lora_weights names its own


def trainable_share(model) -> tuple[int, int]:
    """(trainable parameters, all parameters) of `model`."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def linear_names(model) -> list[str]:
    """The distinct name suffixes of `model`'s linear layers (`to_q`, `to_out.0`, `net.2`, ...)."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = name.split(".")
            first = len(parts) - 1
            while first > 0 and parts[first].isdigit():  # `to_out.0`: name the container too
                first -= 1
            names.add(".".join(parts[first:]))
    return sorted(names)


def add_lora(model, lora: LoraTrainConfig, quiet: bool = False) -> tuple[int, int]:
    """Load lora.init_from's final U-Net weights into `model` (built from the same architecture),
    freeze them and add the adapter; return (trainable, all) parameter counts (printed unless quiet)."""
    from peft import LoraConfig

    run = Path(lora.init_from)
    kind, folder, base = load_base_unet(run, model, "lora.init_from")
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise NasError(f"lora.init_from {run}: its U-Net ({folder}) does not fit the architecture "
                       f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {first})")  # fmt: skip
    del base
    model.requires_grad_(False)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; the scale is alpha / r
        init_lora_weights="gaussian",
        target_modules=list(lora.target_modules),
    )
    try:
        model.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise NasError(f"lora.target_modules {lora.target_modules}: {str(exc).splitlines()[0]} (this U-Net's "
                       f"linear layers: {', '.join(linear_names(model))})") from None  # fmt: skip
    trainable, total = trainable_share(model)
    if not quiet:
        print(
            f"LoRA rank {lora.rank} on {run} ({kind} weights): {trainable:,} of {total:,} parameters "
            f"trainable ({100 * trainable / total:.3f}%)",
            file=sys.stderr,
            flush=True,
        )
    return trainable, total


def save_lora(run: Path, net, lora: LoraTrainConfig) -> Path:
    """RUN/pytorch_lora_weights.safetensors (diffusers' format, the adapter's config as metadata) and
    RUN/lora.json; the weights file is written beside and renamed into place."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    run = Path(run)
    with tempfile.TemporaryDirectory(dir=run, prefix=".lora-") as staging:
        StableDiffusionPipeline.save_lora_weights(
            staging,
            unet_lora_layers=get_peft_model_state_dict(net, adapter_name=ADAPTER),
            unet_lora_adapter_metadata=net.peft_config[ADAPTER].to_dict(),
            weight_name=LORA_WEIGHTS,
        )
        os.replace(Path(staging) / LORA_WEIGHTS, run / LORA_WEIGHTS)
    trainable, total = trainable_share(net)
    kind, _ = weights_folder(Path(lora.init_from), "auto")
    write_json(
        run / LORA_INFO,
        {
            "weights": LORA_WEIGHTS,
            "init_from": str(lora.init_from),
            "base_weights": kind,
            "base_unet_class": type(net).__name__,
            "rank": lora.rank,
            "alpha": lora.alpha,
            "target_modules": list(lora.target_modules),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_share": trainable / total,
        },
    )
    return run / LORA_WEIGHTS
