"""`nas export-pipeline`: a folder StableDiffusionPipeline loads offline, takes a plain text prompt,
and gives the image `nas sample` gives (bit for bit one image at a time, within 1/255 batched)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nas.cli import main
from nas.core.errors import NasError
from nas.sample import (
    SCHEDULERS,
    SampleSettings,
    build_pipeline,
    export_pipeline,
    generate,
    jobs_for,
    load_run,
)

PROMPTS = ["a large red circle in the centre on a white background", "small blue square on the left"]
STEPS, GUIDANCE = 6, 7.5


def _pipeline_images(folder, prompts, seeds):
    from diffusers import StableDiffusionPipeline

    # trust_remote_code: a FlexUNet's class comes from unet/flex_unet.py; no effect on a stock U-Net
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    out = [
        pipe(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        for prompt, seed in zip(prompts, seeds)
    ]
    return pipe, np.stack(out)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_exported_pipeline_reproduces_nas_sample(sample_world, tmp_path, scheduler):
    out = tmp_path / "pipe"
    export_pipeline(sample_world.run_stock, out, scheduler=scheduler)
    jobs = jobs_for(PROMPTS, 2, seed=3)
    pipe, theirs = _pipeline_images(out, [p for p, _ in jobs], [s for _, s in jobs])
    assert type(pipe.scheduler).__name__ == SCHEDULERS[scheduler][0]
    components = load_run(sample_world.run_stock)
    ours_pipe = build_pipeline(components, scheduler)
    settings = SampleSettings(steps=STEPS, guidance=GUIDANCE, scheduler=scheduler, batch_size=1)
    alone = generate(components, ours_pipe, jobs, settings, progress=False)
    assert np.array_equal(alone, theirs)  # one image per call: the same computation, bit for bit
    batched = generate(components, ours_pipe, jobs, SampleSettings(STEPS, GUIDANCE, scheduler, batch_size=4),
                       progress=False)  # fmt: skip
    assert np.abs(batched - theirs).max() < 1e-3  # float rounding of other batch shapes only
    assert np.abs(theirs[0] - theirs[2]).max() > 1e-3  # prompts matter: the comparison can fail


def test_flex_unet_pipeline_loads_with_shipped_code(sample_world, tmp_path, capsys):
    """Loading without `nas` importable: tests/models/test_remote_code.py."""
    out = tmp_path / "pipe"
    assert main(["export-pipeline", str(sample_world.run_flex), "--out", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["flex_unet", "FlexUNet2DConditionModel"]
    pipe, theirs = _pipeline_images(out, PROMPTS[:1], [0])
    assert (
        type(pipe.unet).__module__.endswith(".flex_unet")
        and type(pipe.unet).__name__ == "FlexUNet2DConditionModel"
    )
    components = load_run(sample_world.run_flex)
    ours = generate(components, build_pipeline(components), jobs_for(PROMPTS[:1], 1, 0),
                    SampleSettings(steps=STEPS, guidance=GUIDANCE), progress=False)  # fmt: skip
    assert np.array_equal(ours, theirs)


def test_exported_text_encoder_tokenizes_and_encodes_as_the_cache(sample_world, tmp_path, stock_components):
    """MiniLM through the pipeline: attention mask on, max length = the cache's text_len, so the
    pipeline's own encoding of "" equals the cached empty caption."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "pipe"
    export_pipeline(sample_world.run_stock, out)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    manifest = stock_components.manifest
    assert pipe.tokenizer.model_max_length == manifest["text_len"] == 32
    assert pipe.text_encoder.config.use_attention_mask is True
    assert pipe.vae.config.scaling_factor == manifest["scaling_factor"]
    positive, negative = pipe.encode_prompt(PROMPTS[0], "cpu", 1, True, "")
    assert torch.allclose(negative[0], stock_components.empty_text, atol=1e-5)
    cached_style, _ = stock_components.text_encoder.encode([PROMPTS[0]])
    assert torch.allclose(positive, cached_style, atol=1e-5)


def test_export_folder_layout_is_safetensors_with_provenance(sample_world, tmp_path):
    out = tmp_path / "pipe"
    info = export_pipeline(sample_world.run_stock, out, scheduler="dpmpp")
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / name).is_dir()
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    saved = json.loads((out / "nas_export.json").read_text())
    assert saved == info
    assert saved["weights"] == "ema" and saved["scheduler_class"] == "DPMSolverMultistepScheduler"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing" and scheduler["rescale_betas_zero_snr"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pipe")]  # no staging left behind


def test_export_refuses_bad_input(sample_world, tmp_path, capsys):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(NasError, match="not empty"):
        export_pipeline(sample_world.run_stock, out)
    assert main(["export-pipeline", str(sample_world.run_stock), "--out", str(tmp_path / "x"),
                 "--scheduler", "lms"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert "--scheduler: unknown value 'lms' (allowed: ddim, dpmpp, euler, lcm)" in err and "\n" not in err
    assert main(["export-pipeline", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "run folder not found" in capsys.readouterr().err
