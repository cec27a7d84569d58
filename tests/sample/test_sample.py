"""`nas sample`: schedulers as trained, trailing timesteps, CFG against the cached empty caption,
EMA weights, batching that does not change images, the written files, and bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from nas.cli import main
from nas.core.errors import NasError
from nas.core.grid import LINE_PX, MAX_ROW_LABEL_PX
from nas.sample import (
    SCHEDULERS,
    SampleSettings,
    build_pipeline,
    generate,
    jobs_for,
    load_run,
    make_scheduler,
)

PROMPTS = ["a large red circle in the centre on a white background", "small blue square on the left"]
QUICK = SampleSettings(steps=4, guidance=7.5, batch_size=4)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_is_configured_as_the_run_was_trained(name, stock_components):
    """Each table entry is the named diffusers class with the recipe's betas, zero-SNR and
    prediction type, and the trailing grid starts at T-1 and never reaches t=0."""
    recipe = stock_components.recipe
    scheduler = make_scheduler(name, recipe)
    assert type(scheduler).__name__ == SCHEDULERS[name][0]
    assert scheduler.config.prediction_type == recipe.prediction == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr is recipe.zero_terminal_snr is True
    assert scheduler.config.beta_schedule == recipe.schedule
    scheduler.set_timesteps(10)
    steps = [int(t) for t in scheduler.timesteps]
    assert steps[0] == recipe.num_train_timesteps - 1 and min(steps) > 0
    assert len(set(steps)) == 10


def test_linspace_spacing_evaluates_t0_and_trailing_does_not(stock_components):
    """The spacing option matters: the grid the seed rejects ("linspace") ends at t=0."""
    linspace = make_scheduler("ddim", stock_components.recipe, "linspace")
    linspace.set_timesteps(10)
    assert int(linspace.timesteps[-1]) == 0


def test_unknown_scheduler_and_spacing_are_refused(stock_components):
    with pytest.raises(NasError, match=r"unknown scheduler .*allowed: ddim, dpmpp, euler, lcm"):
        make_scheduler("heun", stock_components.recipe)
    with pytest.raises(NasError, match="allowed: trailing"):
        SampleSettings(spacing="uniform").check()


class Recorder:
    """Wraps a U-Net's forward to record timesteps, text states and extra keyword arguments."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []
        self.original = unet.forward

    def __enter__(self):
        def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
            self.calls.append((float(timestep), encoder_hidden_states.detach().clone(), dict(kwargs)))
            return self.original(sample, timestep, encoder_hidden_states, *args, **kwargs)

        self.unet.forward = forward
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.original


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sampling_never_evaluates_t0_and_guides_against_the_cached_empty_caption(name, stock_components):
    c = stock_components
    pipe = build_pipeline(c, name)
    with Recorder(c.unet) as rec:
        images = generate(
            c, pipe, jobs_for(PROMPTS[:1], 2, 0), replace(QUICK, scheduler=name), progress=False
        )
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    timesteps = [t for t, _, _ in rec.calls]
    assert len(timesteps) == QUICK.steps and min(timesteps) > 0 and max(timesteps) == 999
    for _, text, kwargs in rec.calls:
        assert text.shape[0] == 4  # CFG: [unconditional x2, conditional x2] in one batch
        assert torch.equal(text[0], c.empty_text) and torch.equal(text[1], c.empty_text)
        assert not torch.equal(text[2], c.empty_text)
        assert kwargs.get("encoder_attention_mask") is None  # the mask only feeds the text encoder


def test_images_do_not_depend_on_the_batch_they_were_drawn_in(stock_components):
    c = stock_components
    pipe = build_pipeline(c)
    jobs = jobs_for(PROMPTS, 2, seed=7)
    together = generate(c, pipe, jobs, replace(QUICK, batch_size=4), progress=False)
    alone = generate(c, pipe, jobs, replace(QUICK, batch_size=1), progress=False)
    assert np.abs(together - alone).max() < 1e-4
    assert np.abs(together[0] - together[1]).max() > 0.05  # other seed, other image
    assert np.abs(together[0] - together[2]).max() > 1e-3  # other prompt, other image


def test_guidance_changes_the_image(stock_components):
    c = stock_components
    pipe = build_pipeline(c)
    jobs = jobs_for(PROMPTS[:1], 1, 0)
    guided = generate(c, pipe, jobs, QUICK, progress=False)
    unguided = generate(c, pipe, jobs, replace(QUICK, guidance=1.0), progress=False)
    assert np.abs(guided - unguided).max() > 1e-3


def test_ema_weights_by_default_raw_on_request(sample_world):
    from nas.data.encoders import weights_sha256

    ema = load_run(sample_world.run_stock)
    raw = load_run(sample_world.run_stock, weights="raw")
    assert ema.weights == "ema" and raw.weights == "raw"
    assert ema.model_sha256 == weights_sha256(sample_world.run_stock / "final" / "unet_ema")
    assert raw.model_sha256 != ema.model_sha256


def test_nas_sample_writes_images_sidecars_and_grid(sample_world, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["sample", str(sample_world.run_stock), "--prompt", *PROMPTS, "--n", "3", "--steps", "3"]
    assert main([*argv, "--scheduler", "euler", "--seed", "5", "--out", str(out), "--quiet"]) == 0
    pngs = sorted(out.glob("[0-9]*.png"))
    assert [p.name for p in pngs] == [f"{i:04d}.png" for i in range(6)]
    meta = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert [m["prompt"] for m in meta] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert [m["seed"] for m in meta] == [5, 6, 7, 5, 6, 7]
    first = meta[0]
    assert (first["steps"], first["scheduler"], first["guidance"], first["weights"]) == (
        3,
        "euler",
        7.5,
        "ema",
    )
    assert first["timestep_spacing"] == "trailing" and len(first["model_sha256"]) == 64
    assert Image.open(pngs[0]).size == (32, 32)
    # 3 columns, 2 rows, 2 px borders; 32 px images enlarged x3 to readable 96 px cells; the prompts
    # in a left margin and the seeds and settings in a band on top, outside the cells
    grid = np.asarray(Image.open(out / "grid.png"))
    left, top = grid.shape[1] - (3 * 98 + 2), grid.shape[0] - (2 * 98 + 2)
    assert 0 < left <= MAX_ROW_LABEL_PX and top >= 2 * LINE_PX
    for i, png in enumerate(pngs):  # each cell is its single PNG, enlarged x3 pixel for pixel
        r, c = divmod(i, 3)
        y, x = top + 2 + r * 98, left + 2 + c * 98
        cell = grid[y : y + 96, x : x + 96]
        assert np.array_equal(cell, np.asarray(Image.open(png)).repeat(3, 0).repeat(3, 1)), png.name
    ink = (grid < 128).any(axis=2)
    assert ink[top + 2 : top + 98, :left].sum() > 50 and ink[top + 100 : top + 196, :left].sum() > 50
    assert ink[:top, left:].sum() > 50  # seeds and settings
    assert "wrote 6 images" in capsys.readouterr().out


def test_default_prompts_are_captions_held_out_of_training(sample_world, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", str(sample_world.run_stock), "--steps", "2", "--out", str(out), "--quiet"]) == 0
    prompts = [json.loads(p.read_text())["prompt"] for p in sorted(out.glob("*.json"))]
    from nas.data.cache import open_cache

    captions = open_cache(sample_world.cache).captions()
    assert prompts == captions[-8:][:4]  # val_items=8 in the fixture run: the last 8 are held out


def _run_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_exit_2(sample_world, tmp_path, capsys):
    run = str(sample_world.run_stock)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(sample_world.run_stock / "config.yaml", no_weights / "config.yaml")
    out = ["--out", str(tmp_path / "o")]
    assert "--scheduler: unknown value 'plms' (allowed: ddim, dpmpp, euler, lcm)" in _run_error(
        ["sample", run, "--scheduler", "plms", *out], capsys
    )
    assert "--steps: Input should be greater than or equal to 1" in _run_error(
        ["sample", run, "--steps", "0", *out], capsys
    )
    assert "no prompts" in _run_error(["sample", run, "--prompts-file", str(empty), *out], capsys)
    assert "no U-Net weights" in _run_error(["sample", str(no_weights), *out], capsys)
    assert "run folder not found" in _run_error(["sample", str(tmp_path / "nope"), *out], capsys)
    assert "--guidance: Input should be greater than or equal to 1" in _run_error(
        ["sample", run, "--guidance", "0.5", *out], capsys
    )
    assert not (tmp_path / "o").exists()


def test_encoders_changed_since_the_cache_are_refused(sample_world, tmp_path):
    """A U-Net is never paired with a text encoder other than the one its cache was made with."""
    cache = tmp_path / "cache"
    shutil.copytree(sample_world.cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["text_encoder"]["sha256"] = "0" * 64
    (cache / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "run"
    shutil.copytree(sample_world.run_stock / "final", run / "final")
    config = (sample_world.run_stock / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(sample_world.cache), str(cache)))
    with pytest.raises(NasError, match=r"text encoder .* has changed since the cache was made"):
        load_run(run)
