"""Deploy-time runtimes: one U-Net (diffusers `UNet2DConditionModel` or `FlexUNet2DConditionModel`)
wrapped into a module with the U-Net's call signature, so diffusers pipelines, the sampler
(nas/sample/generate.py), `nas eval` and the latency measurement (nas/cost/measure.py) use it unchanged.

Every wrapper takes and returns float32 tensors on the pipeline's device (`dtype` reports float32,
so the pipeline keeps its latents, prompt embeddings and VAE decode in float32); the precision is
internal to the runtime. Calls: `wrapper(sample [B,C,H,W], timestep (scalar or [B]),
encoder_hidden_states [B,L,D], timestep_cond=None, return_dict=False)[0]` or `.sample` with
`return_dict=True`. `timestep_cond` [B, time_cond_proj_dim]: the guidance embedding of a U-Net whose
config sets time_cond_proj_dim (diffusers' pipelines pass it then, e.g. with LCMScheduler); every
runtime takes it, and refuses it in one line for a U-Net without one.

The ONNX runtimes export the U-Net with nas.deploy.onnx (dynamic batch and token count; a
`timestep_cond` input exactly when the config has time_cond_proj_dim) into a temporary folder that
lives as long as the wrapper.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nas.core.errors import NasError
from nas.core.install import pip_install
from nas.deploy.choices import RUNTIME_PRECISIONS
from nas.deploy.onnx import GUIDANCE_INPUT, export_unet, guidance_dim, onnx_feed


def check_runtime(runtime: str, precision: str, device: str = "cpu") -> None:
    """One-line NasError for an unknown runtime, one not installed, or a precision it lacks."""
    if runtime not in RUNTIMES:
        raise NasError(f"--runtime {runtime!r}: unknown runtime (allowed: {', '.join(RUNTIMES)})")
    cls = RUNTIMES[runtime]
    if precision not in cls.precisions:
        raise NasError(
            f"--precision {precision!r}: not supported by runtime {runtime} "
            f"(allowed: {', '.join(cls.precisions)})"
        )
    for module, package in cls.needs:
        if importlib.util.find_spec(module) is None:
            raise NasError(
                f"--runtime {runtime}: the {package} package is not installed "
                f"({pip_install('-e', '.[deploy]')}; allowed without it: eager, compile)"
            )
    cls.check_device(precision, device)


def wrap_unet(unet, runtime: str = "eager", precision: str = "fp32", device: str = "cpu", tokens: int = 77):
    """The U-Net behind `runtime` at `precision`. Eager and compile convert `unet` in place (no copy:
    an SD 1.5 U-Net is 3.4 GB); the ONNX runtimes export it and keep it only for its config.
    `tokens`: the text length the ONNX export traces with (the axis stays dynamic)."""
    check_runtime(runtime, precision, device)
    return RUNTIMES[runtime](unet, precision=precision, device=device, tokens=tokens)


class RuntimeUNet(torch.nn.Module):
    """Base: keeps the wrapped U-Net (its `config` is what pipelines read) and runs `_run`."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    needs: ClassVar[tuple[tuple[str, str], ...]] = ()  # (import name, package name) to be installed

    def __init__(self, unet, precision: str = "fp32", device: str = "cpu", tokens: int = 77):
        super().__init__()
        self.unet = unet
        self.precision = precision
        self._device = torch.device(device)

    @classmethod
    def check_device(cls, precision: str, device: str) -> None:
        """NasError where `precision` cannot run on `device` (default: every pairing runs)."""

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what it takes and returns; the computation may be narrower

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        *args,
        timestep_cond=None,
        return_dict: bool = True,
        **kwargs,
    ):
        # Arguments our pipelines pass as None (cross_attention_kwargs, added_cond_kwargs, ...) are
        # accepted; any other conditioning would be silently dropped by an exported graph.
        extra = [k for k, v in kwargs.items() if v is not None]
        extra += [f"positional {i + 4}" for i, a in enumerate(args) if a is not None]
        if extra:
            raise NasError(f"runtime {self.name}: U-Net inputs {extra} are not supported")
        if timestep_cond is not None and guidance_dim(self.config) is None:
            raise NasError(
                f"runtime {self.name}: timestep_cond given, but this U-Net has no guidance embedding "
                "(its config's time_cond_proj_dim is null); call it without timestep_cond"
            )
        out = self._run(sample, timestep, encoder_hidden_states, timestep_cond)
        out = out.to(sample.device, torch.float32)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _run(self, sample, timestep, encoder_hidden_states, timestep_cond=None) -> torch.Tensor:
        raise NotImplementedError

    def _graph_inputs(self, names: set[str], timestep_cond) -> None:
        """NasError where the exported graph takes the guidance embedding and the caller gave none."""
        if GUIDANCE_INPUT in names and timestep_cond is None:
            raise NasError(
                f"runtime {self.name}: this U-Net has a guidance embedding (time_cond_proj_dim "
                f"{guidance_dim(self.config)}) and its exported graph needs timestep_cond: the pipeline must "
                "pass it (diffusers' pipelines do, e.g. nas sample --scheduler lcm; or export a U-Net without one)"
            )


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> compute dtype of the PyTorch runtimes


class EagerUNet(RuntimeUNet):
    """PyTorch as is. bf16 / fp16: weights and activations in bfloat16 / float16 (fp16 on CUDA only:
    CPU float16 kernels are few and slow); channels_last: fp32 weights and activations in NHWC
    memory order (faster convolutions on many CPUs and on tensor cores)."""

    name = "eager"
    precisions: ClassVar[tuple[str, ...]] = RUNTIME_PRECISIONS["eager"]

    @classmethod
    def check_device(cls, precision: str, device: str) -> None:
        if precision == "fp16" and not device.startswith("cuda"):
            allowed = ", ".join(p for p in cls.precisions if p != "fp16")
            raise NasError(
                f"--precision fp16 with --runtime {cls.name} needs --device cuda (allowed on {device}: {allowed})"
            )

    def __init__(self, unet, precision: str = "fp32", device: str = "cpu", tokens: int = 77):
        super().__init__(unet, precision, device, tokens)
        self.compute_dtype = HALF.get(precision, torch.float32)
        unet.to(self._device).eval()
        if precision in HALF:  # only then: diffusers logs a warning on every .to(dtype)
            unet.to(self.compute_dtype)
        if precision == "channels_last":
            unet.to(memory_format=torch.channels_last)
        self.model = self._prepare(unet)

    def _prepare(self, unet):
        return unet

    def _run(self, sample, timestep, encoder_hidden_states, timestep_cond=None) -> torch.Tensor:
        x = sample.to(self._device, self.compute_dtype)
        if self.precision == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        text = encoder_hidden_states.to(self._device, self.compute_dtype)
        t = timestep.to(self._device) if torch.is_tensor(timestep) else timestep
        cond = None if timestep_cond is None else timestep_cond.to(self._device, self.compute_dtype)
        with torch.inference_mode():
            return self.model(x, t, text, timestep_cond=cond, return_dict=False)[0]


class CompiledUNet(EagerUNet):
    """torch.compile (inductor; needs a C++ compiler on CPU). The first calls compile: minutes at
    SD 1.5 size; the latency measurement's warm-up forwards absorb them."""

    name = "compile"
    precisions = RUNTIME_PRECISIONS["compile"]

    def _prepare(self, unet):
        return torch.compile(unet)


class CudaGraphUNet(CompiledUNet):
    """torch.compile(mode="reduce-overhead"): inductor kernels replayed as CUDA graphs, which removes
    the per-kernel launch cost that dominates small U-Nets and small batches on a GPU. CUDA only.
    A replay overwrites the previous call's output buffer, so every output is cloned. Inputs, the
    guidance embedding `timestep_cond` among them, are copied into the graph's static input buffers
    by torch.compile's CUDA-graph trees on every replay (a call with and one without it are two graphs)."""

    name = "cudagraphs"
    precisions = RUNTIME_PRECISIONS["cudagraphs"]

    @classmethod
    def check_device(cls, precision: str, device: str) -> None:
        if not device.startswith("cuda"):
            raise NasError(f"--runtime cudagraphs needs --device cuda (CUDA graphs; allowed on {device}: "
                           "eager, compile, onnxruntime, openvino)")  # fmt: skip

    def _prepare(self, unet):
        return torch.compile(unet, mode="reduce-overhead")

    def _run(self, sample, timestep, encoder_hidden_states, timestep_cond=None) -> torch.Tensor:
        return super()._run(sample, timestep, encoder_hidden_states, timestep_cond).clone()


def export_to_temp(unet, tokens: int) -> tuple[tempfile.TemporaryDirectory, Path]:

    tmp = tempfile.TemporaryDirectory(prefix="nas-onnx-")
    path = Path(tmp.name) / "unet.onnx"
    export_unet(unet, path, tokens=tokens, batch=2, batch_dynamic=True)
    return tmp, path


class OnnxRuntimeUNet(RuntimeUNet):
    """ONNX Runtime. int8: weights of MatMul/Gemm quantized to int8 ahead of time, activations
    quantized on the fly (onnxruntime.quantization.quantize_dynamic; CPU). fp16: the graph converted
    to float16 with float32 inputs and outputs kept (CUDAExecutionProvider only: ORT's CPU kernels
    lack most float16 ops)."""

    name = "onnxruntime"
    precisions = RUNTIME_PRECISIONS["onnxruntime"]
    needs = (("onnx", "onnx"), ("onnxruntime", "onnxruntime"))

    @classmethod
    def check_device(cls, precision: str, device: str) -> None:
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        if precision == "fp16" and not (cuda and device.startswith("cuda")):
            raise NasError(
                "--precision fp16 with --runtime onnxruntime needs --device cuda and onnxruntime-gpu "
                f"(CUDAExecutionProvider {'present' if cuda else 'absent'}; allowed here: fp32, int8)"
            )
        if precision == "int8" and device != "cpu":
            raise NasError("--precision int8 with --runtime onnxruntime runs on --device cpu only")

    def __init__(self, unet, precision: str = "fp32", device: str = "cpu", tokens: int = 77):
        import onnxruntime as ort

        super().__init__(unet, precision, device, tokens)
        self._tmp, path = export_to_temp(unet, tokens)
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = path.with_name("unet_int8.onnx")
            # MatMul/Gemm only: ORT's CPU provider has no kernel for the ConvInteger that quantized
            # convolutions become (it would refuse to load the graph).
            quantize_dynamic(
                path, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
            )
            path = quantized
        elif precision == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            half = path.with_name("unet_fp16.onnx")
            onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(half))
            path = half
        providers = ["CUDAExecutionProvider"] if self._device.type == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        # As many threads as torch (set_num_threads / OMP_NUM_THREADS): ORT's own default is every
        # physical core whatever OMP_NUM_THREADS says, so eager and ORT would compare at unequal CPU.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1  # the graph runs sequentially (ORT's default execution mode)
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.path = path

    def _run(self, sample, timestep, encoder_hidden_states, timestep_cond=None) -> torch.Tensor:
        names = {i.name for i in self.session.get_inputs()}
        self._graph_inputs(names, timestep_cond)
        feed = onnx_feed(sample, timestep, encoder_hidden_states, names, timestep_cond)
        return torch.from_numpy(self.session.run(None, feed)[0])


class OpenVinoUNet(RuntimeUNet):
    """OpenVINO reading the ONNX export, on its CPU plugin. fp32 only: int8 needs NNCF's
    post-training quantization (another package, calibration data), not part of the deploy extra."""

    name = "openvino"
    precisions = RUNTIME_PRECISIONS["openvino"]
    needs = (("onnx", "onnx"), ("openvino", "openvino"))

    @classmethod
    def check_device(cls, precision: str, device: str) -> None:
        if device != "cpu":
            raise NasError(f"--runtime openvino runs on --device cpu here (got {device}; allowed: cpu)")

    def __init__(self, unet, precision: str = "fp32", device: str = "cpu", tokens: int = 77):
        import openvino

        super().__init__(unet, precision, device, tokens)
        self._tmp, path = export_to_temp(unet, tokens)
        # f32 hint: on CPUs with AMX or AVX512-BF16 OpenVINO otherwise computes in bf16 by default.
        # Threads: as many as torch's, like ONNX Runtime (OpenVINO's default is every core).
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)

    def _run(self, sample, timestep, encoder_hidden_states, timestep_cond=None) -> torch.Tensor:
        names = {name for port in self.compiled.inputs for name in port.get_names()}
        self._graph_inputs(names, timestep_cond)
        result = self.compiled(onnx_feed(sample, timestep, encoder_hidden_states, names, timestep_cond))
        return torch.from_numpy(np.asarray(result[0]).copy())


# name -> runtime class. One explicit table; `--runtime` choices and docs come from it.
RUNTIMES: dict[str, type[RuntimeUNet]] = {
    "eager": EagerUNet,
    "compile": CompiledUNet,
    "cudagraphs": CudaGraphUNet,
    "onnxruntime": OnnxRuntimeUNet,
    "openvino": OpenVinoUNet,
}
assert tuple(RUNTIMES) == tuple(RUNTIME_PRECISIONS), "one class per runtime of nas/deploy/choices.py"
