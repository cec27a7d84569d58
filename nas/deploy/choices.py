"""The one table of deploy-time runtimes and the precisions each runs, torch-free so that schemas and
command settings take their choices from it (nas/deploy/runtimes.py holds the classes; a test checks
that the two agree). The Literal types below are the table's keys and values spelled once for the
type checker; importing this module asserts they match the table."""

from __future__ import annotations

import typing
from typing import Literal

# runtime -> precisions it runs (first: the default). fp16 needs CUDA (check_runtime says so).
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {
    "eager": ("fp32", "bf16", "fp16", "channels_last"),  # PyTorch as is
    "compile": ("fp32", "bf16", "fp16", "channels_last"),  # torch.compile (inductor)
    "cudagraphs": ("fp32", "bf16", "fp16"),  # torch.compile(mode="reduce-overhead"), CUDA only
    "onnxruntime": ("fp32", "int8", "fp16"),  # int8: dynamic quantization of MatMul/Gemm weights
    "openvino": ("fp32",),  # its CPU plugin on the ONNX export
}
RUNTIMES: tuple[str, ...] = tuple(RUNTIME_PRECISIONS)
PRECISIONS: tuple[str, ...] = tuple(dict.fromkeys(p for ps in RUNTIME_PRECISIONS.values() for p in ps))

Runtime = Literal["eager", "compile", "cudagraphs", "onnxruntime", "openvino"]
Precision = Literal["fp32", "bf16", "fp16", "channels_last", "int8"]
assert typing.get_args(Runtime) == RUNTIMES, "Runtime must list RUNTIME_PRECISIONS' keys in order"
assert typing.get_args(Precision) == PRECISIONS, "Precision must list every precision of the table"


# ONNX export (nas/deploy/onnx.py); here so the CLI can offer the range without importing torch.
DEFAULT_OPSET = 17  # the first opset with LayerNormalization as one op
# 14: the first opset with an export of scaled_dot_product_attention (the attention of every U-Net
# block); 20: the newest the TorchScript exporter knows (torch.onnx._constants).
MIN_OPSET, MAX_OPSET = 14, 20


def precision_error(runtime: str, precision: str) -> str | None:
    """Why (runtime, precision) is not in the table, or None when it is."""
    if runtime not in RUNTIME_PRECISIONS:
        return f"unknown runtime {runtime!r} (allowed: {', '.join(RUNTIMES)})"
    allowed = RUNTIME_PRECISIONS[runtime]
    if precision not in allowed:
        return f"precision {precision} is not one of runtime {runtime}'s (allowed: {', '.join(allowed)})"
    return None
