"""`--scheduler lcm`: a consistency student with a guidance embedding samples in one U-Net call per
step (no classifier-free-guidance half), and the exported pipeline (LCMScheduler) gives the image
`nas sample` gives, bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from nas.cli import main
from nas.core.errors import NasError
from nas.sample import SampleSettings, build_pipeline, export_pipeline, generate, jobs_for, load_run
from tests.sample.test_export_pipeline import PROMPTS

STEPS = 4  # what LCM students are for: 1-8 steps


@pytest.fixture
def lcm_run(sample_world, tmp_path):
    """The stock sample run with its U-Nets given a guidance embedding (time_cond_proj_dim 8) whose
    projection is random, so the output depends on the guidance value fed to it."""
    from diffusers import UNet2DConditionModel

    run = tmp_path / "lcm_run"
    shutil.copytree(sample_world.run_stock, run)
    for folder in (run / "final" / "unet", run / "final" / "unet_ema"):
        if not folder.is_dir():
            continue
        unet = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        student = UNet2DConditionModel.from_config({**dict(unet.config), "time_cond_proj_dim": 8})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
        with torch.no_grad():
            student.time_embedding.cond_proj.weight.normal_(
                0.0, 0.5, generator=torch.Generator().manual_seed(0)
            )
        shutil.rmtree(folder)
        student.save_pretrained(folder)
    return run


def _count_calls(unet) -> list[int]:
    """Batch size of every U-Net call, recorded by a forward pre-hook."""
    batches: list[int] = []
    unet.register_forward_pre_hook(lambda module, args: batches.append(int(args[0].shape[0])))
    return batches


def test_lcm_student_one_call_per_step_and_the_pipeline_agrees(lcm_run, tmp_path):
    out = tmp_path / "pipe"
    export_pipeline(lcm_run, out, scheduler="lcm")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    jobs = jobs_for(PROMPTS, 1, seed=5)
    components = load_run(lcm_run)
    pipe = build_pipeline(components, "lcm")
    calls = _count_calls(pipe.unet)
    ours = generate(components, pipe, jobs, SampleSettings(steps=STEPS, guidance=7.5, scheduler="lcm", batch_size=1),
                    progress=False)  # fmt: skip
    assert calls == [1] * (STEPS * len(jobs))  # one call per step, no unconditional half
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(loaded.scheduler).__name__ == "LCMScheduler"
    _, theirs = _pipeline_images_lcm(out, jobs)
    assert np.array_equal(ours, theirs)  # 0 of 255 levels apart
    weaker = generate(components, pipe, jobs, SampleSettings(steps=STEPS, guidance=2.0, scheduler="lcm", batch_size=1),
                      progress=False)  # fmt: skip
    assert np.abs(weaker - ours).max() > 1e-3  # the guidance value reaches the embedding


def _pipeline_images_lcm(folder, jobs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = [
        pipe(
            prompt,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        for prompt, seed in jobs
    ]
    return pipe, np.stack(images)


def test_lcm_steps_are_bounded(sample_world, tmp_path, capsys):
    with pytest.raises(NasError, match=r"--scheduler lcm takes 1\.\.50 steps"):
        SampleSettings(steps=51, scheduler="lcm").check()
    argv = [
        "sample",
        str(sample_world.run_stock),
        "--scheduler",
        "lcm",
        "--steps",
        "60",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "--scheduler lcm takes 1..50 steps" in capsys.readouterr().err
