"""LoRA on both U-Net classes nas makes, through diffusers' own API (PeftAdapterMixin, the pipeline's
LoRA loader): the same table of tests for the stock class and for FlexUNet2DConditionModel."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from nas.sample import build_pipeline, load_run

CLASSES = {"stock": "UNet2DConditionModel", "flex": "FlexUNet2DConditionModel"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' train_text_to_image_lora.py
PROMPT = "a large red circle in the centre on a white background"


def _inputs(unet):
    config, g = unet.config, torch.Generator().manual_seed(3)
    size = config.sample_size
    return (
        torch.randn(2, config.in_channels, size, size, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 8, config.cross_attention_dim, generator=g),
    )


@torch.no_grad()
def _out(unet, inputs, **kwargs):
    return unet(*inputs, **kwargs).sample


def _image(pipe):
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    return torch.from_numpy(out.images[0])


def _trained_adapter(unet, rank=4):
    """An adapter whose B weights are non-zero, as after some training (seeded)."""
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def saved_lora(sample_world, tmp_path_factory):
    """kind -> (folder written by StableDiffusionPipeline.save_lora_weights, the U-Net it came from)."""
    from diffusers import StableDiffusionPipeline

    folders = {}
    for kind in CLASSES:
        unet = load_run(sample_world.run(kind)).unet
        _trained_adapter(unet)
        folder = tmp_path_factory.mktemp(f"lora_{kind}")
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
        folders[kind] = (folder, unet)
    return folders


@pytest.mark.parametrize("kind", CLASSES)
def test_add_adapter_changes_output_only_once_b_is_trained(sample_world, kind):
    unet = load_run(sample_world.run(kind)).unet
    assert type(unet).__name__ == CLASSES[kind]
    inputs = _inputs(unet)
    base = _out(unet, inputs)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    lora = [n for n, _ in unet.named_parameters() if "lora_" in n]
    assert lora and all(any(f".{t}." in n for t in TARGETS) for n in lora)
    assert torch.equal(_out(unet, inputs), base)  # B = 0: the adapter adds nothing yet
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    changed = _out(unet, inputs)
    assert (changed - base).abs().max() > 1e-3
    # the stock convention for a per-call scale: cross_attention_kwargs={"scale": s}
    half = _out(unet, inputs, cross_attention_kwargs={"scale": 0.5})
    assert 0 < (half - base).abs().max() < (changed - base).abs().max()
    assert torch.equal(_out(unet, inputs, cross_attention_kwargs={"scale": 0.0}), base)


@pytest.mark.parametrize("kind", CLASSES)
def test_saved_lora_loads_scales_fuses_and_unloads_in_a_fresh_pipeline(sample_world, saved_lora, kind):
    from safetensors.torch import load_file

    folder, reference = saved_lora[kind]
    keys = load_file(folder / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("unet.") and ".lora_" in k for k in keys)

    components = load_run(sample_world.run(kind))
    pipe = build_pipeline(components)
    unet = pipe.unet
    inputs = _inputs(unet)
    base, base_image = _out(unet, inputs), _image(pipe)

    pipe.load_lora_weights(folder, adapter_name="shapes")
    assert type(pipe.unet).__name__ == CLASSES[kind] and pipe.unet.active_adapters() == ["shapes"]
    full = _out(unet, inputs)
    assert (full - base).abs().max() > 1e-3
    assert not torch.equal(_image(pipe), base_image)
    # the loaded adapter computes what the saved one did
    torch.testing.assert_close(full, _out(reference, inputs), rtol=0, atol=0)

    pipe.set_adapters(["shapes"], adapter_weights=[0.5])
    half = _out(unet, inputs)
    torch.testing.assert_close(half, _out(reference, inputs, cross_attention_kwargs={"scale": 0.5}),
                               rtol=0, atol=0)  # fmt: skip
    assert 0 < (half - base).abs().max() < (full - base).abs().max()
    pipe.set_adapters(["shapes"], adapter_weights=[1.0])

    pipe.unload_lora_weights()
    assert not any("lora_" in n for n, _ in unet.named_parameters())
    assert torch.equal(_out(unet, inputs), base)  # unfused adapters leave the weights untouched
    assert torch.equal(_image(pipe), base_image)

    pipe.load_lora_weights(folder, adapter_name="shapes")
    pipe.fuse_lora(lora_scale=1.0)
    torch.testing.assert_close(_out(unet, inputs), full, rtol=1e-4, atol=1e-5)
    pipe.unfuse_lora()
    torch.testing.assert_close(_out(unet, inputs), full, rtol=1e-4, atol=1e-5)  # adapter still active
    pipe.unload_lora_weights()
    torch.testing.assert_close(_out(unet, inputs), base, rtol=1e-4, atol=1e-5)  # unfuse: base +- rounding


def test_exported_flex_pipeline_loaded_by_plain_diffusers_takes_a_lora(sample_world, saved_lora, tmp_path):
    """The folder of `nas export-pipeline`, loaded with trust_remote_code (its unet/flex_unet.py, not
    nas's module), takes the LoRA and computes what nas's class does with it."""
    from diffusers import StableDiffusionPipeline

    from nas.sample import export_pipeline

    folder, reference = saved_lora["flex"]
    export_pipeline(sample_world.run_flex, tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(
        tmp_path / "pipe", local_files_only=True, trust_remote_code=True
    )
    assert type(pipe.unet).__name__ == "FlexUNet2DConditionModel"
    assert not type(pipe.unet).__module__.startswith("nas.")  # the shipped copy
    inputs = _inputs(pipe.unet)
    base = _out(pipe.unet, inputs)
    pipe.load_lora_weights(folder)
    torch.testing.assert_close(_out(pipe.unet, inputs), _out(reference, inputs), rtol=0, atol=0)
    assert (_out(pipe.unet, inputs) - base).abs().max() > 1e-3
    pipe.unload_lora_weights()
    assert torch.equal(_out(pipe.unet, inputs), base)


# --- ControlNet ---------------------------------------------------------------------------------------


def _control_image(size):
    from PIL import Image

    pixels = torch.zeros(size, size, 3, dtype=torch.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255  # a square's mask
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize("kind", CLASSES)
def test_controlnet_from_unet_runs_in_the_controlnet_pipeline_and_round_trips(sample_world, kind, tmp_path):
    from diffusers import AutoModel, ControlNetModel

    from nas.sample.controlnet import (
        check_controlnet_fits,
        controlnet_for,
        controlnet_pipeline,
        load_controlnet,
        save_controlnet,
    )

    components = load_run(sample_world.run(kind))
    unet, factor = components.unet, components.resolution // components.unet.config.sample_size
    controlnet = controlnet_for(unet, factor)
    assert isinstance(controlnet, ControlNetModel)  # what StableDiffusionControlNetPipeline accepts
    for name in ("conv_in", "down_blocks"):  # copied from the U-Net
        mine, theirs = getattr(controlnet, name).state_dict(), getattr(unet, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(p.abs().max() == 0 for p in controlnet.controlnet_down_blocks.parameters())  # zero init

    image = _control_image(components.resolution)
    pipe = controlnet_pipeline(components, controlnet)

    def draw(scale=1.0):
        return pipe(PROMPT, image=image, num_inference_steps=2, guidance_scale=7.5, output_type="np",
                    controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    plain = _image(build_pipeline(components))
    torch.testing.assert_close(torch.from_numpy(draw()), plain, rtol=0, atol=1e-6)  # zero init: no effect
    with torch.no_grad():  # as if trained: the outputs now steer the U-Net
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters(),
                  *controlnet.controlnet_cond_embedding.conv_out.parameters()]:  # fmt: skip
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    steered = draw()
    assert (torch.from_numpy(steered) - plain).abs().max() > 1e-2

    save_controlnet(controlnet, tmp_path / "cn")
    assert not list((tmp_path / "cn").glob("*.bin"))
    loaded = load_controlnet(tmp_path / "cn")
    assert type(loaded) is type(controlnet)
    state, again = controlnet.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    if kind == "flex":  # the folder loads in plain diffusers, with its shipped code
        assert {p.name for p in (tmp_path / "cn").glob("*.py")} == {"flex_controlnet.py", "flex_unet.py"}
        remote = AutoModel.from_pretrained(
            str(tmp_path / "cn"), trust_remote_code=True, local_files_only=True
        )
        assert type(remote).__name__ == "FlexControlNetModel" and not type(remote).__module__.startswith(
            "nas."
        )
        pipe.controlnet = remote.eval()
        assert isinstance(remote, ControlNetModel)
        torch.testing.assert_close(torch.from_numpy(draw()), torch.from_numpy(steered), rtol=0, atol=0)
    check_controlnet_fits(loaded, unet, "cn")


def test_controlnet_for_another_unet_and_a_wrong_size_image_are_one_line_errors(sample_world):
    from nas.core.errors import NasError
    from nas.sample.controlnet import check_control_image, check_controlnet_fits, controlnet_for

    stock, flex = load_run(sample_world.run_stock), load_run(sample_world.run_flex)
    controlnet = controlnet_for(flex.unet, flex.resolution // flex.unet.config.sample_size)
    with pytest.raises(NasError, match=r"^cn: a ControlNet for another U-Net: \S+ is [0-9x]+|absent") as err:
        check_controlnet_fits(controlnet, stock.unet, "cn")
    assert "\n" not in str(err.value)
    check_control_image(_control_image(stock.resolution), stock.resolution, "img.png")
    with pytest.raises(NasError, match=r"img.png: control image is 16x16, this run samples 32x32"):
        check_control_image(_control_image(16), stock.resolution, "img.png")
