"""`nas export-onnx`: the U-Net of a run, diffusers U-Net or pipeline folder as OUT/unet.onnx, checked
against eager PyTorch with ONNX Runtime, and OUT/export.json (shapes, check, versions). A U-Net with a
guidance embedding (time_cond_proj_dim) gets a fourth input, timestep_cond [B, time_cond_proj_dim]. The export of a
module itself is nas/deploy/onnx.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nas.core.errors import NasError
from nas.deploy.onnx import (
    DEFAULT_OPSET,
    DEFAULT_TOKENS,
    EXTERNAL_DATA_THRESHOLD,
    FP32_TOLERANCE,
    GUIDANCE_INPUT,
    compare_with_eager,
    data_path,
    export_unet,
    guidance_dim,
    weights_bytes,
)
from nas.models.load import find_unet, load_unet


def load_source_unet(source: Path) -> tuple[Any, int, str]:
    """(U-Net, text length, kind) from a `nas train` run folder, a diffusers U-Net folder
    (config.json + *.safetensors) or a pipeline folder with unet/. A run's text length is its cache's."""
    from nas.sample.components import read_run_config

    found = find_unet(source, "source")
    tokens = DEFAULT_TOKENS
    if found.run is not None:
        config = read_run_config(found.run)
        manifest = Path(config.cache or "") / "manifest.json"
        if config.cache and manifest.is_file():
            tokens = int(json.loads(manifest.read_text()).get("text_len", tokens))
    return load_unet(found.folder), tokens, found.kind


def export_folder(
    source: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    batch_dynamic: bool = False,
    batch: int = 2,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict:
    """`nas export-onnx`: OUT/unet.onnx (and OUT/unet.onnx.data with weights over
    `external_data_threshold` bytes) and OUT/export.json; NasError when the check fails."""
    import onnx
    import onnxruntime

    source, out = Path(source), Path(out)
    unet, tokens, kind = load_source_unet(source)
    path = out / "unet.onnx"
    external = export_unet(unet, path, tokens, batch, batch_dynamic, opset, external_data_threshold)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise NasError(f"{path}: onnx.checker refused the export ({str(exc).splitlines()[0]})") from None
    check_batch = batch + 1 if batch_dynamic else batch  # a batch not traced, where it may differ
    diff = compare_with_eager(unet, path, check_batch, tokens)
    size = unet.config.sample_size
    channels, dim = unet.config.in_channels, unet.config.cross_attention_dim
    b = "B" if batch_dynamic else batch
    inputs: dict[str, list] = {
        "sample": [b, channels, size, size],
        "timestep": [b],
        "encoder_hidden_states": [b, "L", dim],
    }
    if guidance_dim(unet.config) is not None:  # the guidance embedding (LCM students)
        inputs[GUIDANCE_INPUT] = [b, guidance_dim(unet.config)]
    report = {
        "source": str(source),
        "source_kind": kind,
        "model_class": type(unet).__name__,
        "file": path.name,
        "external_data": data_path(path).name if external else None,  # the weights file beside it
        "weights_bytes": weights_bytes(unet),
        "external_data_threshold": external_data_threshold,
        "opset": opset,
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "inputs": inputs,
        "outputs": {"out_sample": [b, channels, size, size]},
        "traced_tokens": tokens,
        "batch_dynamic": batch_dynamic,
        "check": {"batch": check_batch, "tokens": tokens, "tolerance": FP32_TOLERANCE, "max_abs_diff": diff},
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    if not diff <= FP32_TOLERANCE:  # also catches NaN
        raise NasError(
            f"{path}: ONNX Runtime differs from eager PyTorch by {diff:.3g} (tolerance {FP32_TOLERANCE:g}); "
            "see export.json"
        )
    return report
