"""The end-to-end split (nas/sample/timing.py): text encoder, U-Net and VAE decode timed while a
pipeline generates; U-Net evaluations per image are 2 per CFG step and 1 per guidance-embedded
(LCM) step; the hooks are gone afterwards."""

from __future__ import annotations

import pytest

from nas.sample import SampleSettings, build_pipeline, generate, jobs_for, load_run
from nas.sample.timing import PARTS, StageClock, split_line
from tests.sample.test_lcm import lcm_run  # noqa: F401 (fixture)

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _timed(components, pipe, settings: SampleSettings):
    clock = StageClock()
    jobs = jobs_for(PROMPTS, 1, seed=0)
    images = generate(components, pipe, jobs, settings, progress=False, clock=clock)
    return clock.report(), images


@pytest.mark.parametrize(("guidance", "per_step"), [(7.5, 2), (1.0, 1)])
def test_split_counts_cfg_and_sums_to_the_wall_time(sample_world, guidance, per_step):
    components = load_run(sample_world.run_stock)
    pipe = build_pipeline(components, "ddim")
    report, images = _timed(components, pipe, SampleSettings(steps=3, guidance=guidance, batch_size=2))
    assert report["images"] == len(PROMPTS) == len(images)
    assert report["unet_evals_per_image"] == 3 * per_step  # 1 = no guidance: diffusers skips the empty half
    assert report["unet_forwards"] == 3 * 2  # 3 steps x 2 batches (2 + 1 images)
    for part in (*PARTS, "other"):
        assert report[f"{part}_s"] >= 0
    assert report["unet_s"] > 0 and report["vae_decode_s"] > 0 and report["text_encoder_s"] > 0
    parts = sum(report[f"{part}_s"] for part in (*PARTS, "other"))
    assert parts == pytest.approx(report["seconds"], rel=1e-3, abs=1e-3)
    assert report["images_per_s"] == pytest.approx(len(PROMPTS) / report["seconds"], rel=1e-3)
    assert "images/s" in split_line(report) and "U-Net" in split_line(report)
    # detached: no hook left on the U-Net, the VAE's own decode back
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks
    assert "decode" not in vars(pipe.vae)
    _, same = _timed(components, pipe, SampleSettings(steps=3, guidance=guidance, batch_size=2))
    assert (same == images).all()  # timing changes nothing in the images


def test_guidance_embedded_student_is_one_evaluation_per_step(lcm_run):  # noqa: F811
    components = load_run(lcm_run)
    pipe = build_pipeline(components, "lcm")
    report, _ = _timed(components, pipe, SampleSettings(steps=4, guidance=8.0, scheduler="lcm", batch_size=3))
    assert report["unet_evals_per_image"] == 4 and report["unet_batch"] == 3
