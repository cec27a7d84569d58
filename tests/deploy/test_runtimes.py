"""Deploy-time runtimes (nas/deploy/runtimes.py) and `nas export-onnx` (nas/deploy/onnx.py) on the tiny
stock and Flex U-Nets of tests/fixtures/sample.py."""

from __future__ import annotations

import copy
import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from nas.cli import main
from nas.core.errors import NasError
from nas.deploy.runtimes import RUNTIMES, check_runtime, wrap_unet

HAS_CUDA = torch.cuda.is_available()
PROMPTS = ["a red circle", "a blue square"]

# |pixel difference| (images in [0, 1]) after 2 DDIM steps at guidance 7.5 against eager fp32, as
# (statistic, bound). fp32 runtimes differ by float reassociation only (measured max 1e-5), so their
# largest difference is bounded; bf16 (8-bit mantissa) and int8 weights differ for real, and CFG's 7.5x
# amplifies single pixels (measured max 0.19 bf16, 0.32 int8), so their mean is bounded: measured
# 0.012 (bf16) and 0.029 (int8) on the tiny stock run, bounds about twice that.
IMAGE_TOLERANCE = {
    "fp32": ("max", 1e-3),
    "channels_last": ("max", 1e-3),
    "bf16": ("mean", 0.025),
    "int8": ("mean", 0.06),
    "fp16": ("mean", 0.025),
}


def _cases():
    for runtime, cls in RUNTIMES.items():
        for precision in cls.precisions:
            marks = []
            if runtime in ("compile", "cudagraphs"):  # inductor compiles for minutes on a busy 2-core machine
                marks.append(pytest.mark.slow)
            if precision == "fp16" or runtime == "cudagraphs":  # CUDA only (check_device refuses the CPU)
                marks += [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
            for module, _ in cls.needs:
                if importlib.util.find_spec(module) is None:
                    marks.append(pytest.mark.skip(reason=f"{module} not installed (the deploy extra)"))
            yield pytest.param(runtime, precision, marks=marks, id=f"{runtime}-{precision}")


@pytest.fixture(scope="module")
def reference_images(stock_components):
    from nas.sample.generate import SampleSettings, build_pipeline, generate, jobs_for

    comp = replace(stock_components, unet=copy.deepcopy(stock_components.unet))
    settings = SampleSettings(steps=2, batch_size=2)
    pipe = build_pipeline(comp, settings.scheduler, settings.spacing)
    return generate(comp, pipe, jobs_for(PROMPTS, 1, 0), settings, progress=False)


@pytest.mark.parametrize(("runtime", "precision"), list(_cases()))
def test_each_runtime_and_precision_samples_like_eager(
    runtime, precision, stock_components, reference_images
):
    from nas.sample.generate import SampleSettings, build_pipeline, generate, jobs_for

    device = "cuda" if precision == "fp16" or runtime == "cudagraphs" else "cpu"
    comp = replace(stock_components, unet=copy.deepcopy(stock_components.unet)).to(device)
    settings = SampleSettings(steps=2, batch_size=2, runtime=runtime, precision=precision).check()
    pipe = build_pipeline(comp, settings.scheduler, settings.spacing, runtime, precision)
    if (runtime, precision) == ("eager", "fp32"):  # the U-Net as loaded, unwrapped
        assert pipe.unet is comp.unet and not isinstance(pipe.unet, RUNTIMES["eager"])
    else:
        assert isinstance(pipe.unet, RUNTIMES[runtime]) and pipe.unet.precision == precision
    images = generate(comp, pipe, jobs_for(PROMPTS, 1, 0), settings, progress=False)
    assert images.shape == reference_images.shape and np.isfinite(images).all()
    statistic, bound = IMAGE_TOLERANCE[precision]
    diff = float(getattr(np.abs(images - reference_images), statistic)())
    assert diff <= bound, f"{runtime} {precision}: {statistic} pixel difference {diff} > {bound}"


@pytest.mark.parametrize("run_kind", ["stock", "flex"])
def test_export_onnx_matches_eager(run_kind, sample_world, tmp_path, capsys):
    import onnx

    run = sample_world.run_stock if run_kind == "stock" else sample_world.run_flex
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(run), "--out", str(out), "--batch-dynamic"]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["model_class"] == (
        "UNet2DConditionModel" if run_kind == "stock" else "FlexUNet2DConditionModel"
    )
    assert 0 <= report["check"]["max_abs_diff"] <= report["check"]["tolerance"] == 1e-4
    assert report["check"]["batch"] == 3  # not the traced batch 2: the batch axis is really dynamic
    assert report["opset"] == 17 and report["source_kind"] == "run (ema weights)"
    assert (
        report["inputs"]["sample"] == ["B", 4, 8, 8] and report["inputs"]["encoder_hidden_states"][2] == 384
    )
    model = onnx.load(str(out / "unet.onnx"))
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert "max |diff|" in capsys.readouterr().out


def test_export_onnx_of_a_diffusers_folder_with_a_fixed_batch(sample_world, tmp_path):
    from nas.sample.onnx_export import export_folder

    report = export_folder(sample_world.run_stock / "final" / "unet", tmp_path / "o", opset=14, batch=1)
    assert report["source_kind"] == "diffusers folder" and report["inputs"]["timestep"] == [1]
    assert report["check"]["max_abs_diff"] <= 1e-4 and report["opset"] == 14


def test_export_onnx_refuses_a_folder_without_a_unet(sample_world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((sample_world.run_stock / "config.yaml").read_text())
    for source in (run, tmp_path):  # a run without final/, a folder that is no run at all
        assert main(["export-onnx", str(source), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("no U-Net" in err), err
    assert not (tmp_path / "o" / "unet.onnx").exists()


def test_bad_runtime_or_precision_is_one_line_exit_2(sample_world, capsys, monkeypatch):
    run = str(sample_world.run_stock)
    for argv, expected in [
        (
            ["sample", run, "--runtime", "tensorrt"],
            "allowed: eager, compile, cudagraphs, onnxruntime, openvino",
        ),
        (["sample", run, "--runtime", "openvino", "--precision", "int8"], "allowed: fp32"),
        (
            ["eval", run, "--runtime", "eager", "--precision", "int8"],
            "allowed: fp32, bf16, fp16, channels_last",
        ),
        (
            [
                "inspect",
                "search_spaces/archs/tiny_stock.yaml",
                "--latency",
                "--runtime",
                "onnxruntime",
                "--precision",
                "bf16",
            ],
            "allowed: fp32, int8, fp16",
        ),
        (["inspect", "search_spaces/archs/tiny_stock.yaml", "--runtime", "openvino"], "add --latency"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    if not HAS_CUDA:
        with pytest.raises(NasError, match="needs --device cuda"):
            check_runtime("onnxruntime", "fp16", "cpu")
    for runtime, precision in (("eager", "fp16"), ("compile", "fp16"), ("cudagraphs", "fp32")):
        with pytest.raises(NasError, match="needs --device cuda"):  # whatever the machine has
            check_runtime(runtime, precision, "cpu")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "openvino" else real_find_spec(name)
    )
    with pytest.raises(NasError, match="openvino package is not installed"):
        wrap_unet(torch.nn.Linear(1, 1), "openvino")


def _inspect_cases():
    """Every runtime at its first precision; marks (slow, gpu, not installed) as in _cases."""
    seen = set()
    for case in _cases():
        runtime = case.values[0]
        if runtime not in seen:
            seen.add(runtime)
            yield case


@pytest.mark.parametrize(("runtime", "precision"), list(_inspect_cases()))
def test_inspect_times_every_runtime(runtime, precision, capsys):
    device = "cuda" if runtime == "cudagraphs" else "cpu"
    argv = ["inspect", "search_spaces/archs/tiny_stock.yaml", "--latency", "--json", "--warmup", "1",
            "--iters", "2", "--device", device, "--runtime", runtime, "--precision", precision]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runtime"], report["precision"]) == (runtime, precision) and report["latency_ms_p50"] > 0


def test_inspect_latency_behind_a_runtime(capsys):
    argv = [
        "inspect",
        "search_spaces/archs/tiny_flex.yaml",
        "--latency",
        "--json",
        "--warmup",
        "1",
        "--iters",
        "2",
    ]
    assert main([*argv, "--runtime", "onnxruntime"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["runtime"], report["precision"], report["iters"]) == ("onnxruntime", "fp32", 2)
    assert report["latency_ms_p50"] > 0
    assert main([*argv, "--dtype", "bf16", "--runtime", "eager"]) == 2
    assert "instead of --dtype" in capsys.readouterr().err


def test_scalar_and_batched_timesteps_agree(stock_components):
    unet = copy.deepcopy(stock_components.unet)
    wrapped = wrap_unet(copy.deepcopy(unet), "onnxruntime", "fp32", tokens=32)
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 32, 384, generator=gen)
    with torch.no_grad():
        expected = unet(x, 500, text).sample
    for t in (torch.tensor(500), torch.tensor([500, 500]), 500.0):
        assert (wrapped(x, t, text).sample - expected).abs().max() < 1e-4
        assert (wrapped(x, t, text, return_dict=False)[0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_unet_without_attention_runs_behind_the_onnx_runtimes(runtime):
    """With no attention layer the text is never read, so the export has no encoder_hidden_states
    input; the runtimes must feed only the inputs the graph declares."""
    from nas.space import build_unet
    from nas.space.build import arch_from_dict

    arch = arch_from_dict(
        {
            "name": "no-attention",
            "settings": {"latent_size": 8, "cross_attention_dim": 16, "text_len": 4, "norm_num_groups": 8},
            "levels": [{"channels": 16, "resnets": 1, "attentions": 0, "up_attentions": 0, "heads": 2}],
            "mid": None,
        }
    )
    torch.manual_seed(0)
    unet = build_unet(arch).eval()
    wrapped = wrap_unet(copy.deepcopy(unet), runtime, "fp32", tokens=4)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16)
    with torch.no_grad():
        expected = unet(x, 500, text).sample
    assert (wrapped(x, 500, text).sample - expected).abs().max() < 1e-4


def test_space_latency_section_takes_a_runtime(tiny_space, monkeypatch):
    import pydantic

    import nas.cost.measure
    from nas.search.objective import measure_cost
    from nas.space import load_arch
    from nas.space.schema import LatencySetup

    assert LatencySetup().runtime == "eager"
    for bad in (
        {"runtime": "openvino", "precision": "int8"},  # not one of openvino's precisions
        {"runtime": "onnxruntime", "dtype": "bf16"},  # the precision, not dtype, says it
        {"runtime": "onnxruntime", "source": "table", "table": "t.json"},  # a table times eager only
    ):
        with pytest.raises(pydantic.ValidationError):
            LatencySetup(**bad)
    seen = {}
    real = nas.cost.measure.measure_latency

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **{**kwargs, "warmup": 0, "iters": 1})

    monkeypatch.setattr(nas.cost.measure, "measure_latency", spy)
    setup = LatencySetup(runtime="onnxruntime", precision="int8", reference="none")  # timed alone
    space = tiny_space.model_copy(update={"latency": setup})
    cost = measure_cost(space, load_arch("search_spaces/archs/tiny_stock.yaml"))
    assert (seen["runtime"], seen["precision"]) == ("onnxruntime", "int8") and cost["latency_ms_p50"] > 0


def test_runtime_names_agree_with_the_table():
    """The CLI and space schema spell the runtimes and precisions out (pydantic Literals for the
    one-line error) from nas.deploy.choices; the runtime classes take their precisions from its table."""
    from typing import get_args

    from nas.commands.sample import Precision, Runtime
    from nas.deploy.choices import PRECISIONS, RUNTIME_PRECISIONS
    from nas.space.schema import LatencySetup

    assert {name: cls.precisions for name, cls in RUNTIMES.items()} == RUNTIME_PRECISIONS

    assert (
        set(get_args(Runtime))
        == set(RUNTIMES)
        == set(get_args(LatencySetup.model_fields["runtime"].annotation))
    )
    assert (
        set(get_args(Precision))
        == set(PRECISIONS)
        == set(get_args(LatencySetup.model_fields["precision"].annotation))
    )
