"""`nas sample/eval --controlnet`: the images plain diffusers gives with the exported pipeline and the
trained ControlNet folder in StableDiffusionControlNetPipeline (0 of 255 levels apart), for both U-Net
classes; the model card; bad input is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nas.cli import main
from nas.sample import export_pipeline, to_uint8
from nas.train.controlnet import CONTROLNET_DIR
from tests.fixtures.sample import KINDS

PROMPT = "a large red circle in the centre on a white background"
STEPS, GUIDANCE, SEEDS = 3, 7.5, (0, 1)


@pytest.fixture(scope="module")
def controlnet_runs(sample_world, tmp_path_factory):
    """kind -> a `controlnet:` run trained 3 steps at a large lr (so it steers visibly)."""
    from nas.train import load_config
    from nas.train.loop import train_arch

    runs = {}
    for kind in KINDS:
        out = tmp_path_factory.mktemp(f"cn_{kind}") / "run"
        config = load_config("tiny", ["val_items=8", "val_timesteps=1", "batch_size=4", "lr=5e-2",
                                      "lr_schedule=constant", "warmup_steps=0", "ema=null",
                                      f"controlnet.init_from={sample_world.run(kind)}"], max_steps=3)  # fmt: skip
        train_arch(config, cache_path=sample_world.cache, out=out, quiet=True)
        runs[kind] = out
    return runs


@pytest.fixture(scope="module")
def control_png(tmp_path_factory):
    from nas.data import shapes

    path = tmp_path_factory.mktemp("control") / "mask.png"
    shapes.condition(5, 32, 0, "mask").save(path)
    return path


def _nas_sample(run, out, *extra):
    argv = ["sample", str(run), "--prompt", PROMPT, "--n", str(len(SEEDS)), "--steps", str(STEPS),
            "--batch-size", "1", "--out", str(out), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0
    return np.stack([np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(len(SEEDS))])


@pytest.mark.parametrize("kind", KINDS)
def test_nas_sample_controlnet_equals_the_exported_pipeline_in_plain_diffusers(
    sample_world, controlnet_runs, control_png, tmp_path, kind
):
    from diffusers import (
        AutoModel,
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    run, cn = sample_world.run(kind), controlnet_runs[kind]
    ours = _nas_sample(run, tmp_path / "ours", "--controlnet", str(cn), "--control-image", str(control_png))
    export_pipeline(run, tmp_path / "pipe")
    base = StableDiffusionPipeline.from_pretrained(
        tmp_path / "pipe", local_files_only=True, trust_remote_code=True
    )
    loader = AutoModel if kind == "flex" else ControlNetModel  # the flex folder ships its code
    controlnet = loader.from_pretrained(
        str(cn / CONTROLNET_DIR), local_files_only=True, trust_remote_code=True
    )
    assert type(controlnet).__name__ == ("FlexControlNetModel" if kind == "flex" else "ControlNetModel")
    assert not type(controlnet).__module__.startswith("nas.")  # plain diffusers, no nas class
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(control_png)
    theirs = to_uint8(np.stack([
        pipe(PROMPT, image=image, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
             generator=torch.Generator().manual_seed(seed)).images[0]
        for seed in SEEDS
    ]))  # fmt: skip
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0  # 0 of 255 levels
    plain = _nas_sample(run, tmp_path / "plain")
    assert np.abs(plain.astype(int) - ours.astype(int)).max() > 0  # the ControlNet steers: can fail
    off = _nas_sample(run, tmp_path / "off", "--controlnet", str(cn), "--control-image", str(control_png),
                      "--controlnet-scale", "0")  # fmt: skip
    assert np.array_equal(off, plain)
    sidecar = json.loads((tmp_path / "ours" / "0000.json").read_text())
    assert sidecar["controlnet"]["scale"] == 1 and sidecar["controlnet"]["condition"] == "mask"
    assert (
        sidecar["controlnet"]["folder"].endswith(CONTROLNET_DIR)
        and len(sidecar["controlnet"]["sha256"]) == 64
    )
    assert json.loads((tmp_path / "plain" / "0000.json").read_text())["controlnet"] is None


def test_nas_eval_controlnet_draws_each_prompts_condition(
    sample_world, controlnet_runs, tiny_evaluator, tmp_path
):
    run = sample_world.run_flex
    argv = ["eval", str(run), "--evaluator", str(tiny_evaluator), "--steps", "1", "--n", "4", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "without")]) == 0
    assert main([*argv, "--out", str(tmp_path / "with"), "--controlnet", str(controlnet_runs["flex"])]) == 0
    without, with_ = (json.loads((tmp_path / n / "eval.json").read_text()) for n in ("without", "with"))
    assert without["controlnet"] is None and with_["controlnet"]["condition"] == "mask"
    assert with_["prompts"] == without["prompts"] and with_["seed"] == without["seed"]
    for report in (without, with_):
        assert {"position", "size"} <= report["results"][0]["alignment_by_attribute"].keys()


def test_controlnet_card_parses_as_a_hub_model_card(controlnet_runs):
    from huggingface_hub import ModelCard

    from nas.sample.card import write_controlnet_card

    for kind in KINDS:
        path = write_controlnet_card(controlnet_runs[kind])
        assert path == controlnet_runs[kind] / CONTROLNET_DIR / "README.md"
        card = ModelCard.load(path)
        assert card.data.library_name == "diffusers" and "controlnet" in card.data.tags
        assert ("custom-code" in card.data.tags) == (kind == "flex")
        assert "StableDiffusionControlNetPipeline" in card.text and "mask" in card.text


def test_bad_controlnet_input_is_one_line_exit_2(
    sample_world, controlnet_runs, control_png, tmp_path, capsys
):
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 16)).save(small)
    argv = ["sample", str(sample_world.run_stock), "--steps", "1", "--out", str(tmp_path / "o"), "--quiet"]
    cases = [
        (["--controlnet", str(controlnet_runs["stock"]), "--control-image", str(small)],
         "control image is 16x16, this run samples 32x32"),
        (["--controlnet", str(controlnet_runs["flex"]), "--control-image", str(control_png)],
         "a ControlNet for another U-Net"),
        (["--controlnet", str(sample_world.run_stock / "final" / "unet"), "--control-image", str(control_png)],
         "not a ControlNet folder (config.json's _class_name is 'UNet2DConditionModel'"),
        (["--controlnet", str(tmp_path), "--control-image", str(control_png)], "not a ControlNet folder (no config.json"),
        (["--controlnet", str(controlnet_runs["stock"])], "--controlnet and --control-image go together"),
    ]  # fmt: skip
    for extra, message in cases:
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and message in err, err
