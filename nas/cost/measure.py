"""Cost of an architecture: parameters, MACs with the attention matmuls counted, latency, memory.

MACs count multiply-accumulates of convolutions, linear layers and the attention matmuls QK^T and
AV; normalisations, activations, softmax and resampling are left out (well under 1% of a U-Net).
fvcore, thop and torch's FlopCounterMode on CPU all miss the attention matmuls (the fused CPU SDPA
kernel has no formula), which is most of the cost at high resolution. Here the count runs on the
meta device (no memory, no compute: SD 1.5 counts in under a second), where SDPA decomposes into
the batched matmuls FlopCounterMode counts; fused SDPA kernels, met on real devices, get a formula.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from nas.space.build import build_unet
from nas.space.schema import Arch

aten = torch.ops.aten
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sdpa_flops(query_shape, key_shape, value_shape) -> int:
    """FLOPs (2 x MACs) of QK^T and AV: B*H*Lq*Lk*(D + Dv) MACs."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * lk * (d + dv)


def _fused_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query, key, value)


# Fused kernels FlopCounterMode lacks a formula for on some devices (the CPU flash kernel).
_SDPA_OPS = [
    getattr(aten, name) for name in ("_scaled_dot_product_flash_attention_for_cpu",) if hasattr(aten, name)
]
# Ops that appear only inside attention in diffusers U-Nets (decomposed or fused SDPA).
ATTENTION_OPS = {
    "aten.bmm",
    "aten.baddbmm",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_cudnn_attention",
}


def example_inputs(arch: Arch, batch: int = 1, tokens: int | None = None, device="cpu", dtype=torch.float32):
    """(sample, timestep, encoder_hidden_states) shaped for `arch`."""
    s = arch.settings
    if str(device) == "meta":  # shapes only: no CPU memory even for the largest in-bounds inputs
        return (
            torch.empty(batch, s.latent_channels, s.latent_size, s.latent_size, device="meta"),
            torch.full((batch,), 500, dtype=torch.long, device="meta"),
            torch.empty(batch, tokens or s.text_len, s.cross_attention_dim, device="meta"),
        )
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, s.latent_channels, s.latent_size, s.latent_size, generator=gen)
    text = torch.randn(batch, tokens or s.text_len, s.cross_attention_dim, generator=gen)
    timestep = torch.full((batch,), 500, dtype=torch.long)
    return sample.to(device, dtype), timestep.to(device), text.to(device, dtype)


def guidance_input(arch: Arch, batch: int = 1, device="cpu", dtype=torch.float32) -> torch.Tensor | None:
    """The `timestep_cond` of an arch with a guidance embedding (settings.time_cond_proj_dim), else
    None: w = 7 (guidance scale 8) embedded as LCM pipelines do. Passed by keyword (the 4th positional
    argument of a U-Net's forward is class_labels); the forward runs without it too, cond_proj unused."""
    dim = arch.settings.time_cond_proj_dim
    if dim is None:
        return None
    if str(device) == "meta":
        return torch.empty(batch, dim, device="meta")
    from nas.models.guidance import guidance_embedding

    return guidance_embedding(torch.full((batch,), 7.0), dim).to(device, dtype)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, inputs: tuple) -> dict[str, Any]:
    """{'macs', 'attention_macs', per-op 'by_op'} for one forward with `inputs` (any device)."""
    counter = FlopCounterMode(display=False, custom_mapping={op: _fused_sdpa for op in _SDPA_OPS})
    with counter, torch.no_grad():
        model(*inputs)
    by_op = {str(op): int(flops) // 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    attention = sum(v for k, v in by_op.items() if k in ATTENTION_OPS)
    return {"macs": sum(by_op.values()), "attention_macs": attention, "by_op": by_op}


def arch_cost(arch: Arch, batch: int = 1, tokens: int | None = None) -> dict[str, Any]:
    """Parameters and MACs of `arch`, computed on the meta device (no weights allocated)."""
    model = build_unet(arch, device="meta")
    cond = guidance_input(arch, batch, device="meta")  # params and MACs include cond_proj
    forward = model if cond is None else partial(model, timestep_cond=cond)
    macs = count_macs(forward, example_inputs(arch, batch, tokens, device="meta"))  # type: ignore[arg-type]
    return {
        "params": count_params(model),
        "macs": macs["macs"],
        "attention_macs": macs["attention_macs"],
        "attention_share": macs["attention_macs"] / max(macs["macs"], 1),
        "model_class": type(model).__name__,
        "batch": batch,
        "tokens": tokens or arch.settings.text_len,
        "latent_size": arch.settings.latent_size,
    }


@dataclass
class Latency:
    latency_ms_p50: float  # median of the timed forwards
    latency_ms_p90: float
    peak_memory_mb: float  # CUDA max allocated on GPU; process peak RSS on CPU
    device: str
    batch: int
    dtype: str
    iters: int
    channels_last: bool
    compiled: bool
    other_cores_busy: float = 0.0  # CPU cores other processes kept busy while timing (CPU only)
    runtime: str = "eager"  # key of nas.deploy.runtimes.RUNTIMES the U-Net ran behind
    precision: str | None = None  # that runtime's precision (None: eager with `dtype`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Other processes' load above this many cores during a CPU measurement triggers a LoadWarning: on
# 2 cores, a training job beside the timing inflated latencies 2-3x (README, "latency under contention").
BUSY_CORES_WARN = 0.5


class LoadWarning(UserWarning):
    """A CPU latency was measured while other processes were busy; it is likely inflated."""


class OtherLoad:
    """Context manager: CPU cores that processes other than this one kept busy while the block ran
    (system-wide busy CPU time minus this process's, over wall time; psutil, any OS)."""

    _BUSY = ("user", "nice", "system", "irq", "softirq", "steal")  # guest time is already in user

    def _system_busy(self) -> float:
        times = psutil.cpu_times()
        return sum(getattr(times, field, 0.0) for field in self._BUSY)

    def _own(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def __enter__(self) -> OtherLoad:
        self._process = psutil.Process()
        self._start = (time.perf_counter(), self._system_busy(), self._own())
        self.cores = 0.0
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        wall = time.perf_counter() - wall0
        other = (self._system_busy() - busy0) - (self._own() - own0)
        self.cores = max(0.0, other / wall) if wall > 0 else 0.0


_warned: list[bool] = []  # one warning per process: a search measures every trial


def warn_if_loaded(cores: float, what: str = "latency") -> None:
    if cores > BUSY_CORES_WARN and not _warned:
        _warned.append(True)
        warnings.warn(
            f"{what} measured while other processes kept {cores:.1f} of {psutil.cpu_count()} CPU cores busy; "
            "CPU latencies under contention read 2-3x high, measure on a quiet machine",
            LoadWarning,
            stacklevel=3,
        )


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else


class Forward:
    """A model made ready to time once: wrapped behind a runtime, moved, cast, laid out and compiled
    as asked, with its example inputs; `time_ms()` runs and times one forward (CUDA events on GPU).
    Kept across measurements where one model is timed again and again (a search's baseline).
    `runtime` (nas.deploy.runtimes.RUNTIMES key): the U-Net wrapped at `precision` and called with
    fp32 inputs as a sampler calls it; `dtype`, `channels_last` and `compile` are then the precision's.
    An arch with a guidance embedding is called with `timestep_cond` (guidance_input), as LCM sampling
    calls it, on every runtime."""

    def __init__(
        self,
        model: torch.nn.Module,
        arch: Arch,
        device: str = "cpu",
        batch: int = 1,
        dtype: str = "fp32",
        tokens: int | None = None,
        channels_last: bool = False,
        compile: bool = False,
        runtime: str | None = None,
        precision: str = "fp32",
    ):
        dev = torch.device(device)
        if runtime is not None:
            from nas.core.errors import NasError
            from nas.deploy.runtimes import wrap_unet

            if (dtype, channels_last, compile) != ("fp32", False, False):
                raise NasError(
                    "with a runtime, give the precision instead of dtype, channels_last or compile"
                )
            model = wrap_unet(
                model, runtime, precision, device=device, tokens=tokens or arch.settings.text_len
            )
        model = model.to(dev).eval()
        if dtype != "fp32":
            model = model.to(DTYPES[dtype])
        inputs = example_inputs(arch, batch, tokens, device=dev, dtype=DTYPES[dtype])
        cond = guidance_input(arch, batch, device=dev, dtype=DTYPES[dtype])  # as a sampler passes it
        self.kwargs: dict[str, Any] = {} if cond is None else {"timestep_cond": cond}
        if channels_last:
            # nn.Module.to takes memory_format at run time (torch docs); its typed overloads omit it.
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
        self.arch, self.device, self.inputs = arch, dev, inputs
        self.run = torch.compile(model) if compile else model
        self.cuda = dev.type == "cuda"
        self.settings: dict[str, Any] = dict(
            device=str(dev),
            batch=batch,
            dtype=dtype,
            channels_last=channels_last,
            compiled=compile,
            runtime=runtime or "eager",
            precision=precision if runtime else None,
        )

    def __call__(self) -> None:
        with torch.inference_mode():
            self.run(*self.inputs, **self.kwargs)

    def time_ms(self) -> float:
        """One forward, in milliseconds of wall time (CUDA events on GPU)."""
        with torch.inference_mode():
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.run(*self.inputs, **self.kwargs)
                end.record()
                torch.cuda.synchronize(self.device)
                return start.elapsed_time(end)
            t0 = time.perf_counter()
            self.run(*self.inputs, **self.kwargs)
            return (time.perf_counter() - t0) * 1000

    def peak_memory_mb(self) -> float:
        """CUDA max allocated since the last reset on GPU; the process's peak RSS on CPU."""
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else _peak_rss_mb()

    def latency(self, times: list[float], other_cores_busy: float) -> Latency:
        """The Latency of this forward from its timed forwards (milliseconds)."""
        ordered = sorted(times)
        return Latency(
            latency_ms_p50=statistics.median(ordered),
            latency_ms_p90=ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
            peak_memory_mb=self.peak_memory_mb(),
            iters=len(times),
            other_cores_busy=0.0 if self.cuda else round(other_cores_busy, 2),
            **self.settings,
        )


def measure_latency(
    model: torch.nn.Module,
    arch: Arch,
    device: str = "cpu",
    batch: int = 1,
    dtype: str = "fp32",
    warmup: int = 3,  # untimed forwards (allocator, cudnn autotune, compile)
    iters: int = 10,  # timed forwards
    tokens: int | None = None,
    channels_last: bool = False,
    compile: bool = False,
    runtime: str | None = None,
    precision: str = "fp32",
) -> Latency:
    """Forward latency in inference mode: warm-up, then `iters` timed forwards; CUDA events on GPU
    (`Forward` says how `runtime`, `dtype`, `channels_last` and `compile` apply)."""
    forward = Forward(model, arch, device, batch, dtype, tokens, channels_last, compile, runtime, precision)
    if forward.cuda:
        torch.cuda.reset_peak_memory_stats(forward.device)
    with OtherLoad() as load:
        for _ in range(warmup):
            forward()
        times = [forward.time_ms() for _ in range(iters)]
    if not forward.cuda:
        warn_if_loaded(load.cores)
    return forward.latency(times, load.cores)


def setup_kwargs(setup: Any) -> dict[str, Any]:
    """`Forward`'s settings as a space's `latency:` section gives them (nas.space.schema.LatencySetup).
    Eager fp32 times the bare U-Net, as `nas inspect --latency` without --runtime does."""
    plain = (setup.runtime, setup.precision) == ("eager", "fp32")
    return {
        "device": setup.device,
        "batch": setup.batch,
        "dtype": setup.dtype,
        "runtime": None if plain else setup.runtime,
        "precision": setup.precision,
    }


def measure_setup(model: torch.nn.Module, arch: Arch, setup: Any, **overrides: Any) -> Latency:
    """`measure_latency` as a space's `latency:` section says (nas.space.schema.LatencySetup: device,
    batch, dtype, warm-up, iterations, runtime and precision); `overrides` replace any of them."""
    kwargs = {**setup_kwargs(setup), "warmup": setup.warmup, "iters": setup.iters}
    return measure_latency(model, arch, **{**kwargs, **overrides})


def count_macs_fvcore(model: torch.nn.Module, inputs: tuple) -> dict[str, Any]:
    """Independent count: fvcore's JIT-trace counter plus a handle for SDPA (which fvcore skips),
    on real tensors. Norms and resampling, which fvcore counts by default, are dropped so both
    counters measure the same thing. Slower than `count_macs`; used to cross-check it."""
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

    def sdpa_handle(jit_inputs, outputs) -> int:
        q, k, v = (get_shape(x) for x in jit_inputs[:3])
        return _sdpa_flops(q, k, v) // 2  # fvcore counts one MAC as one "flop"

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args, return_dict=False)[0]

    analysis = FlopCountAnalysis(Wrapped(model).eval(), inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    by_op = {op: int(n) for op, n in analysis.by_operator().items() if op in _FVCORE_COUNTED}
    attention = by_op.get("scaled_dot_product_attention", 0)
    return {"macs": sum(by_op.values()), "attention_macs": attention, "by_op": by_op}


# fvcore op names that match what `count_macs` counts (it also counts norms and upsampling).
_FVCORE_COUNTED = {"conv", "linear", "matmul", "bmm", "einsum", "addmm", "scaled_dot_product_attention"}
