"""The guidance embedding (`timestep_cond`, settings.time_cond_proj_dim) behind every deploy runtime:
the tiny stock and Flex U-Nets with a random guidance projection, each runtime x precision against
eager fp32, the `nas export-onnx` graph's extra input, and `--scheduler lcm` sampling behind ONNX
Runtime."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from nas.cli import main
from nas.core.errors import NasError
from nas.deploy.onnx import FP32_TOLERANCE
from nas.deploy.runtimes import RUNTIMES, wrap_unet
from tests.deploy.test_runtimes import IMAGE_TOLERANCE, _cases, _inspect_cases
from tests.fixtures.space import ARCHS

DIM = 8  # guidance-embedding width of the test U-Nets (LCM: 256)
W_LOW, W_HIGH = 1.0, 6.5  # two guidance weights (scales 2 and 7.5) whose outputs must differ
# std of the random cond_proj weights (zero-initialised, w would be invisible): 2 moves the outputs at
# W_LOW and W_HIGH apart by a mean 0.12-0.16 on the tiny U-Nets, twice the widest bound below.
COND_STD = 2.0
# U-Net outputs against eager fp32: fp32 runtimes to the export check's FP32_TOLERANCE (measured
# about 1e-6), the others by the image bounds of test_runtimes.py (measured mean |diff| 0.003 bf16,
# 0.0016 int8 on these U-Nets, whose outputs are of unit scale).
UNET_TOLERANCE = {
    **IMAGE_TOLERANCE,
    "fp32": ("max", FP32_TOLERANCE),
    "channels_last": ("max", FP32_TOLERANCE),
}


def _difference(a: torch.Tensor, b: torch.Tensor, statistic: str) -> float:
    return float(getattr((a - b).abs(), statistic)())


def _guided(unet, seed: int = 0):
    """A copy of `unet`'s class and weights with a guidance embedding of width DIM whose projection is
    random (as after training), so the output depends on w."""
    student = type(unet).from_config({**dict(unet.config), "time_cond_proj_dim": DIM})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(
            0.0, COND_STD, generator=torch.Generator().manual_seed(seed)
        )
    return student.eval()


@pytest.fixture(scope="module")
def guided(sample_world):
    """{'stock' | 'flex': (guided U-Net, inputs, {w: eager fp32 output})}, built once."""
    from nas.models.guidance import guidance_embedding
    from nas.models.load import load_unet

    out = {}
    for kind, run in (("stock", sample_world.run_stock), ("flex", sample_world.run_flex)):
        unet = _guided(load_unet(run / "final" / "unet_ema"))
        gen = torch.Generator().manual_seed(0)
        x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 32, 384, generator=gen)
        t = torch.tensor([999, 500])
        conds = {w: guidance_embedding(torch.full((2,), w), DIM) for w in (W_LOW, W_HIGH)}
        with torch.no_grad():
            reference = {w: unet(x, t, text, timestep_cond=c).sample for w, c in conds.items()}
        out[kind] = (unet, (x, t, text), conds, reference)
    return out


@pytest.mark.parametrize("kind", ["stock", "flex"])
@pytest.mark.parametrize(("runtime", "precision"), list(_cases()))
def test_every_runtime_takes_timestep_cond_like_eager(runtime, precision, kind, guided):
    unet, (x, t, text), conds, reference = guided[kind]
    device = "cuda" if precision == "fp16" or runtime == "cudagraphs" else "cpu"
    statistic, bound = UNET_TOLERANCE[precision]
    # w is visible beyond the tolerance: a runtime that dropped timestep_cond would fail below
    assert _difference(reference[W_LOW], reference[W_HIGH], statistic) > bound
    wrapped = wrap_unet(copy.deepcopy(unet), runtime, precision, device=device, tokens=text.shape[1])
    assert isinstance(wrapped, RUNTIMES[runtime]) and wrapped.config.time_cond_proj_dim == DIM
    for w, cond in conds.items():
        got = wrapped(x.to(device), t.to(device), text.to(device), timestep_cond=cond.to(device)).sample.cpu()
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        diff = _difference(got, reference[w], statistic)
        assert diff <= bound, f"{runtime} {precision} {kind} w={w}: {statistic} |diff| {diff} > {bound}"
    if runtime in ("onnxruntime", "openvino"):  # the graph has the input: calling without it is refused
        with pytest.raises(NasError, match="needs timestep_cond: the pipeline must pass it") as info:
            wrapped(x, t, text)
        assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_timestep_cond_for_a_unet_without_the_embedding_is_refused(runtime, stock_components):
    wrapped = wrap_unet(copy.deepcopy(stock_components.unet), runtime, "fp32", tokens=32)
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 32, 384)
    with pytest.raises(NasError, match=r"has no guidance embedding .*time_cond_proj_dim is null") as info:
        wrapped(x, 500, text, timestep_cond=torch.ones(1, DIM))
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(NasError, match=r"U-Net inputs \['class_labels'\] are not supported"):
        wrapped(x, 500, text, class_labels=torch.zeros(1))  # other conditioning: refused as before
    assert wrapped(x, 500, text, timestep_cond=None).sample.shape == x.shape  # None: as without it


@pytest.mark.parametrize(("runtime", "precision"), list(_inspect_cases()))
def test_inspect_times_a_guided_arch_behind_every_runtime(runtime, precision, tmp_path, capsys):
    """Latency measurement (nas inspect, a space's latency: section) calls the U-Net with the
    guidance embedding as LCM sampling does; the ONNX runtimes' graphs would refuse it otherwise."""
    import yaml

    from nas.cost.measure import Forward
    from nas.space import build_unet, load_arch

    data = load_arch(ARCHS / "tiny_flex.yaml").to_data()
    data["settings"]["time_cond_proj_dim"] = DIM
    path = tmp_path / "guided.yaml"
    path.write_text(yaml.safe_dump(data))
    device = "cuda" if runtime == "cudagraphs" else "cpu"
    argv = ["inspect", str(path), "--latency", "--json", "--warmup", "1", "--iters", "2", "--device", device,
            "--runtime", runtime, "--precision", precision]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runtime"], report["precision"]) == (runtime, precision) and report["latency_ms_p50"] > 0
    arch = load_arch(path)
    forward = Forward(build_unet(arch), arch, batch=3)  # eager: the cond is passed too (cond_proj timed)
    assert tuple(forward.kwargs["timestep_cond"].shape) == (3, DIM)
    plain = load_arch(ARCHS / "tiny_flex.yaml")
    assert Forward(build_unet(plain), plain).kwargs == {}  # no embedding: called as before


@pytest.fixture(scope="module")
def guided_runs(sample_world, tmp_path_factory):
    """The stock and flex sample runs with their U-Nets (EMA and raw) given a random guidance embedding."""
    from nas.models.load import load_unet

    root = tmp_path_factory.mktemp("guided_runs")
    runs = {}
    for kind, source in (("stock", sample_world.run_stock), ("flex", sample_world.run_flex)):
        run = root / kind
        shutil.copytree(source, run)
        for folder in (run / "final" / "unet", run / "final" / "unet_ema"):
            if folder.is_dir():
                _guided(load_unet(folder)).save_pretrained(folder)  # overwrites config.json and weights
        runs[kind] = run
    return runs


@pytest.mark.parametrize("kind", ["stock", "flex"])
def test_export_onnx_of_a_guided_run_has_the_timestep_cond_input(kind, guided_runs, tmp_path):
    import onnx
    import onnxruntime as ort

    from nas.models.guidance import guidance_embedding
    from nas.models.load import load_unet

    out = tmp_path / "onnx"
    assert main(["export-onnx", str(guided_runs[kind]), "--out", str(out), "--batch-dynamic"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["inputs"]["timestep_cond"] == ["B", DIM]
    assert report["check"]["max_abs_diff"] <= FP32_TOLERANCE and report["check"]["batch"] == 3
    graph = onnx.load(str(out / "unet.onnx")).graph
    names = [i.name for i in graph.input]
    assert names == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    cond_shape = graph.input[3].type.tensor_type.shape.dim
    assert (cond_shape[0].dim_param, cond_shape[1].dim_value) == ("batch", DIM)
    # the folder's graph on ONNX Runtime, another batch and w than the export's check, against eager
    unet = load_unet(guided_runs[kind] / "final" / "unet_ema")
    session = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    x, text = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 32, 384, generator=gen)
    t = torch.tensor([900.0, 600.0, 300.0, 10.0])
    results = {}
    for w in (W_LOW, W_HIGH):
        cond = guidance_embedding(torch.full((4,), w), DIM)
        feed = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": text.numpy(),
                "timestep_cond": cond.numpy()}  # fmt: skip
        got = torch.from_numpy(session.run(None, feed)[0])
        with torch.no_grad():
            expected = unet(x, t, text, timestep_cond=cond).sample
        assert (got - expected).abs().max() <= FP32_TOLERANCE
        results[w] = got
    assert (results[W_LOW] - results[W_HIGH]).abs().max() > 100 * FP32_TOLERANCE


def test_export_onnx_without_the_embedding_has_three_inputs(sample_world, tmp_path):
    from nas.sample.onnx_export import export_folder

    report = export_folder(sample_world.run_flex, tmp_path / "o", batch=1)
    assert list(report["inputs"]) == ["sample", "timestep", "encoder_hidden_states"]


def test_lcm_sampling_behind_onnxruntime_matches_eager(guided_runs, tmp_path):
    """`--scheduler lcm` feeds `timestep_cond` (w = guidance - 1) through ONNX Runtime's graph: the
    images are those of eager fp32 within test_runtimes.py's fp32 bound, and w reaches the graph."""
    from nas.sample import SampleSettings, build_pipeline, generate, jobs_for, load_run

    run = guided_runs["stock"]
    jobs = jobs_for(["a red circle", "a blue square"], 1, seed=2)
    images = {}
    for runtime, guidance in (("eager", 7.5), ("onnxruntime", 7.5), ("onnxruntime", 2.0)):
        components = load_run(run)
        settings = SampleSettings(steps=2, guidance=guidance, scheduler="lcm", batch_size=2, runtime=runtime)
        pipe = build_pipeline(components, "lcm", settings.spacing, runtime, "fp32")
        assert isinstance(pipe.unet, RUNTIMES["onnxruntime"]) == (runtime == "onnxruntime")
        images[runtime, guidance] = generate(components, pipe, jobs, settings.check(), progress=False)
    statistic, bound = IMAGE_TOLERANCE["fp32"]
    diff = float(getattr(np.abs(images["onnxruntime", 7.5] - images["eager", 7.5]), statistic)())
    assert diff <= bound, f"onnxruntime vs eager, lcm: {statistic} pixel difference {diff} > {bound}"
    weaker = float(np.abs(images["onnxruntime", 2.0] - images["onnxruntime", 7.5]).max())
    assert weaker > 10 * bound  # the guidance value reaches the exported graph
    # the command itself: exit 0, the sidecar names the runtime
    out = tmp_path / "samples"
    argv = ["sample", str(run), "--scheduler", "lcm", "--steps", "2", "--runtime", "onnxruntime",
            "--prompt", "a red circle", "--n", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    sidecars = [json.loads(p.read_text()) for p in out.rglob("*.json")]
    assert any(s.get("runtime") == "onnxruntime" and s.get("scheduler") == "lcm" for s in sidecars), sidecars
