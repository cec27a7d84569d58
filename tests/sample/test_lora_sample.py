"""`nas sample --lora`: the images plain diffusers gives with `pipe.load_lora_weights` (0 of 255
levels apart), for both U-Net classes; a LoRA of another architecture is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nas.cli import main
from nas.sample import export_pipeline, load_run, to_uint8
from tests.fixtures.sample import KINDS

PROMPT = "a large red circle in the centre on a white background"
STEPS, GUIDANCE, SEEDS = 4, 7.5, (0, 1)


@pytest.fixture(scope="module")
def loras(sample_world, tmp_path_factory):
    """kind -> a LoRA folder (save_lora_weights) whose B weights are far from zero."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folders = {}
    for kind in KINDS:
        unet = load_run(sample_world.run(kind)).unet
        torch.manual_seed(0)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        folder = tmp_path_factory.mktemp(f"lora_{kind}")
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
        folders[kind] = folder
    return folders


def _nas_sample(run, out, *extra):
    argv = ["sample", str(run), "--prompt", PROMPT, "--n", str(len(SEEDS)), "--steps", str(STEPS),
            "--batch-size", "1", "--out", str(out), "--quiet", *extra]  # fmt: skip
    assert main(argv) == 0
    return np.stack([np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(len(SEEDS))])


@pytest.mark.parametrize("kind", KINDS)
def test_nas_sample_lora_equals_diffusers_load_lora_weights(sample_world, loras, tmp_path, kind):
    from diffusers import StableDiffusionPipeline

    run = sample_world.run(kind)
    ours = _nas_sample(run, tmp_path / "ours", "--lora", str(loras[kind]))
    export_pipeline(run, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "pipe", local_files_only=True, trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(loras[kind])
    images = [
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
             generator=torch.Generator().manual_seed(seed)).images[0]
        for seed in SEEDS
    ]  # fmt: skip
    theirs = to_uint8(np.stack(images))
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() == 0  # 0 of 255 levels
    plain = _nas_sample(run, tmp_path / "plain")
    assert np.abs(plain.astype(int) - ours.astype(int)).max() > 10  # the LoRA matters: the test can fail
    off = _nas_sample(run, tmp_path / "off", "--lora", str(loras[kind]), "--lora-scale", "0")
    assert np.array_equal(off, plain)
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "off").glob("*.json"))]
    assert sidecars and all(
        s["lora"]["scale"] == 0 and s["lora"]["file"].endswith(".safetensors") for s in sidecars
    )
    assert all(json.loads(p.read_text())["lora"] is None for p in (tmp_path / "plain").glob("*.json"))


def test_lora_of_another_architecture_is_one_line_exit_2(sample_world, loras, tmp_path, capsys):
    argv = ["sample", str(sample_world.run_stock), "--steps", "1", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--lora", str(loras["flex"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "pytorch_lora_weights.safetensors: a LoRA for another architecture: module " in err
    assert main([*argv, "--lora", str(tmp_path)]) == 2
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err
