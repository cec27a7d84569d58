"""Cost model: MACs with attention, cross-checked three independent ways; latency and memory."""

import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nas.cost.measure
from nas.cost.measure import (
    LoadWarning,
    OtherLoad,
    arch_cost,
    count_macs,
    count_macs_fvcore,
    example_inputs,
    measure_latency,
)
from nas.space import build_unet, load_arch
from tests.fixtures.space import ARCHS


def analytic_macs(model, inputs):
    """Count from first principles with forward hooks: conv = out elements x Cin/groups x k x k,
    linear = out elements x in features, attention = 2 x B x Lq x Lk x inner dim (QK^T and AV)."""
    from diffusers.models.attention_processor import Attention

    total = {"macs": 0, "attention_macs": 0}

    def conv(mod, inp, out):
        total["macs"] += out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]

    def linear(mod, inp, out):
        total["macs"] += out.numel() * mod.in_features

    def attention(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        context = hidden if context is None else context
        b, lq = hidden.shape[0], hidden.shape[1]
        macs = 2 * b * lq * context.shape[1] * mod.inner_dim
        total["macs"] += macs
        total["attention_macs"] += macs

    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_pre_hook(attention, with_kwargs=True))
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("index", [0, 7, 13, 21, 50, 51])  # 50, 51: tiny_stock and tiny_flex
def test_macs_agree_three_ways(tiny_archs, index):
    arch = tiny_archs[index]
    model = build_unet(arch).eval()
    inputs = example_inputs(arch)
    meta = arch_cost(arch)  # FlopCounterMode on the meta device (decomposed SDPA)
    fv = count_macs_fvcore(model, inputs)  # fvcore JIT trace + SDPA handle on real tensors
    hand = analytic_macs(model, inputs)  # hooks and closed forms
    assert meta["macs"] == fv["macs"] == hand["macs"], arch.name
    assert meta["attention_macs"] == fv["attention_macs"] == hand["attention_macs"], arch.name


def test_attention_is_what_plain_counters_miss():
    """FlopCounterMode on CPU tensors without our SDPA formula misses exactly the attention."""
    arch = load_arch(ARCHS / "tiny_flex.yaml")
    model = build_unet(arch).eval()
    inputs = example_inputs(arch)
    plain = FlopCounterMode(display=False)
    with plain, torch.no_grad():
        model(*inputs)
    ours = count_macs(model, inputs)
    assert ours["attention_macs"] > 0
    assert plain.get_total_flops() // 2 == ours["macs"] - ours["attention_macs"]


def test_sd15_macs_match_published_figures():
    """Published SD 1.5 counts (338-339 GMACs at 64x64) leave attention out; ours adds it."""
    cost = arch_cost(load_arch(ARCHS / "sd15.yaml"))
    assert cost["params"] == 859_520_964
    assert cost["macs"] == 401_636_720_640
    assert cost["attention_macs"] == 63_026_135_040
    assert 338e9 <= cost["macs"] - cost["attention_macs"] <= 339e9
    # One self-attention at 64x64 with 320 channels: 2 x 4096 x 4096 x 320 MACs, twice per block
    # on 5 blocks (2 down + 3 up) of level 0.
    self_attention_level0 = 5 * 2 * 4096 * 4096 * 320
    assert cost["attention_macs"] > self_attention_level0


def test_macs_scale_with_batch_and_tokens():
    arch = load_arch(ARCHS / "tiny_stock.yaml")
    one, two = arch_cost(arch, batch=1), arch_cost(arch, batch=2)
    assert two["macs"] == 2 * one["macs"]
    short = arch_cost(arch, tokens=8)
    assert short["macs"] < one["macs"] and short["params"] == one["params"]


def test_cpu_latency_and_memory():
    arch = load_arch(ARCHS / "tiny_stock.yaml")
    lat = measure_latency(build_unet(arch), arch, device="cpu", warmup=1, iters=5)
    assert 0 < lat.latency_ms_p50 <= lat.latency_ms_p90
    assert lat.peak_memory_mb > 10 and lat.device == "cpu" and lat.iters == 5
    lat_cl = measure_latency(build_unet(arch), arch, warmup=1, iters=2, channels_last=True, dtype="bf16")
    assert lat_cl.channels_last and lat_cl.dtype == "bf16" and lat_cl.latency_ms_p50 > 0
    assert lat.other_cores_busy >= 0 and lat_cl.other_cores_busy >= 0


def test_load_from_other_processes_is_measured_and_warned(monkeypatch):
    """A process spinning beside the measurement is counted; this process's own work is not.
    Bounds come from CPU times measured in the same window, so they hold on a loaded machine."""
    import psutil

    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass"]
    )
    spinner, me = psutil.Process(spin.pid), psutil.Process()
    try:
        time.sleep(0.3)  # let the spinner start
        spin0, own0, t0 = sum(spinner.cpu_times()[:2]), sum(me.cpu_times()[:2]), time.perf_counter()
        with OtherLoad() as load:
            t = time.perf_counter()
            while time.perf_counter() - t < 1.0:  # this process busy too: must not be counted
                pass
        wall = time.perf_counter() - t0
        spin_cores = (sum(spinner.cpu_times()[:2]) - spin0) / wall
        own_cores = (sum(me.cpu_times()[:2]) - own0) / wall
    finally:
        spin.wait()
    assert load.cores >= spin_cores - 0.15  # the spinner is another process: counted
    # Other processes can keep at most the cores this one left; counting our own work would
    # overshoot by about `own_cores` (~1 on a quiet machine, ~0.5 with both cores loaded).
    assert load.cores <= psutil.cpu_count() - own_cores + 0.25
    monkeypatch.setattr(nas.cost.measure, "_warned", [])
    with pytest.warns(LoadWarning, match="other processes kept 1.0 of"):
        nas.cost.measure.warn_if_loaded(1.0)
    nas.cost.measure.warn_if_loaded(
        1.0
    )  # second call: silent (pytest.warns would not see it; the flag says so)
    assert nas.cost.measure._warned == [True]
    nas.cost.measure._warned.clear()
    nas.cost.measure.warn_if_loaded(0.2)  # below the threshold: no warning
    assert nas.cost.measure._warned == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "dtype",
    [
        "fp32",
        # Measured on an H200 (2026-12-04, eager, batch 2, 64x64): sd15 28.8 ms, decidiffusion_v1
        # 30.9 ms in fp16. In eager fp16 at batch 2 both are launch-bound and the DeciDiffusion layout
        # runs more, smaller kernels; its fewer MACs pay off in fp32 (passed there). The seed's 1.4x
        # was measured with its own runtime; docs/cost.md has the figures.
        pytest.param(
            "fp16",
            marks=pytest.mark.xfail(reason="eager fp16 batch 2 on an H200: launch-bound", strict=False),
        ),
    ],
)
def test_gpu_latency_sd15_vs_decidiffusion(dtype):
    """Measured on a GPU: the DeciDiffusion layout is faster per step than SD 1.5 (fp32)."""
    results = {}
    for name in ("sd15", "decidiffusion_v1"):
        arch = load_arch(ARCHS / f"{name}.yaml")
        lat = measure_latency(build_unet(arch), arch, device="cuda", dtype=dtype, batch=2, warmup=5, iters=20)
        assert 0 < lat.latency_ms_p50 <= lat.latency_ms_p90 and lat.peak_memory_mb > 100
        results[name] = lat.latency_ms_p50
    print(f"\n{dtype}: sd15 {results['sd15']:.1f} ms, decidiffusion_v1 {results['decidiffusion_v1']:.1f} ms")
    assert results["decidiffusion_v1"] < results["sd15"]
