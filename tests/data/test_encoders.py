"""VAE and text encoders load from local folders, tokenize as diffusers' pipeline does, and train."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nas.core.errors import NasError
from nas.data.encoders import (
    MINILM,
    VaeTrainConfig,
    load_text_encoder,
    load_vae,
    measure_scaling_factor,
    train_vae,
    vae_identity,
)
from tests.fixtures.data import make_tiny_vae


def test_load_vae_and_identity(tiny_vae_dir, tmp_path):
    vae = load_vae(tiny_vae_dir)
    assert type(vae).__name__ == "AutoencoderKL" and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    ident = vae_identity(tiny_vae_dir)
    assert ident["sha256"] == vae_identity(tiny_vae_dir)["sha256"] and len(ident["sha256"]) == 64
    # An SD-style pipeline folder (PATH/vae/) loads the same weights.
    pipeline = tmp_path / "pipe"
    shutil.copytree(tiny_vae_dir, pipeline / "vae")
    assert vae_identity(pipeline)["sha256"] == ident["sha256"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert load_vae(pipeline).encode(x).latent_dist.mean.shape == (2, 4, 8, 8)
    # Another seed, other weights, another hash.
    assert vae_identity(make_tiny_vae(tmp_path / "other", seed=1))["sha256"] != ident["sha256"]


def test_load_vae_rejects_what_is_not_an_autoencoderkl(tmp_path):
    from diffusers import UNet2DModel

    with pytest.raises(NasError, match="VAE folder not found"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NasError, match=r"no config\.json"):
        load_vae(tmp_path / "empty")
    UNet2DModel(
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(tmp_path / "unet")
    with pytest.raises(NasError, match=r"_class_name is 'UNet2DModel'.*AutoencoderKL"):
        load_vae(tmp_path / "unet")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(NasError, match="cannot load as AutoencoderKL"):
        load_vae(broken)


def test_minilm_encoder(minilm):
    assert minilm.identity["path"] == MINILM and minilm.identity["class"] == "BertModel"
    assert (minilm.max_length, minilm.hidden_size) == (32, 384)
    assert minilm.tokenizer.model_max_length == 32 and minilm.model.config.use_attention_mask
    hidden, mask = minilm.encode(["a small red circle in the top left on a white background", ""])
    assert hidden.shape == (2, 32, 384) and hidden.dtype == torch.float32
    assert mask.dtype == torch.long and mask[1].sum() == 2  # [CLS] [SEP]
    long_caption = " ".join(["red"] * 100)
    assert minilm.encode([long_caption])[1].sum() == 32  # truncated to max_length
    # Padding is masked inside the model: the real tokens do not depend on the padding length.
    short = load_text_encoder(MINILM, max_length=16)
    want = minilm.encode(["a red circle"])[0][0, :5]
    assert torch.allclose(short.encode(["a red circle"])[0][0, :5], want, atol=1e-5)


def test_tiny_clip_from_folder(tiny_clip_dir, tmp_path):
    enc = load_text_encoder(str(tiny_clip_dir))
    assert enc.identity["class"] == "CLIPTextModel" and enc.max_length == 77 and enc.hidden_size == 32
    hidden, mask = enc.encode(["a red circle", "two"])
    assert hidden.shape == (2, 77, 32) and mask.shape == (2, 77)
    assert not getattr(enc.model.config, "use_attention_mask", False)  # SD runs CLIP unmasked
    with pytest.raises(NasError, match="max_length 100: must be between 1 and 77"):
        load_text_encoder(str(tiny_clip_dir), max_length=100)
    sd = tmp_path / "sd"
    shutil.copytree(tiny_clip_dir, sd / "text_encoder")
    shutil.copytree(tiny_clip_dir, sd / "tokenizer")
    assert torch.equal(load_text_encoder(str(sd)).encode(["a red circle"])[0], hidden[:1])
    with pytest.raises(NasError, match="text encoder folder not found"):
        load_text_encoder(str(tmp_path / "nope"))


@pytest.mark.parametrize("which", ["clip", "minilm"])
def test_encode_matches_stable_diffusion_pipeline(which, tiny_clip_dir, tiny_vae_dir, minilm):
    """A pipeline built from these components encodes prompts exactly as TextEncoder.encode."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    enc = load_text_encoder(str(tiny_clip_dir)) if which == "clip" else minilm
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
                                cross_attention_dim=enc.hidden_size, attention_head_dim=2)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=load_vae(tiny_vae_dir), text_encoder=enc.model, tokenizer=enc.tokenizer,
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    prompts = ["a large blue square at the bottom on a gray background", "a red circle"]
    embeds, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
    assert torch.equal(embeds, enc.encode(prompts)[0])


def test_measured_scaling_factor_gives_unit_variance(tiny_vae_dir, shapes_images):
    vae = load_vae(tiny_vae_dir)
    factor = measure_scaling_factor(vae, shapes_images)
    assert factor == pytest.approx(vae.config.scaling_factor)
    z = vae.encode(shapes_images).latent_dist.sample(generator=torch.Generator().manual_seed(1)) * factor
    assert z.std().item() == pytest.approx(1.0, abs=0.05)


def test_train_vae_short_run(shapes_images, tmp_path):
    config = VaeTrainConfig(
        block_out_channels=(16, 16, 32), steps=40, batch_size=8, val_images=8, learning_rate=2e-3
    )
    before = config.build()
    report = train_vae(shapes_images, tmp_path / "vae", config)
    vae = load_vae(tmp_path / "vae")
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert (
        json.loads((tmp_path / "vae" / "vae_train.json").read_text())["val_psnr_db"] == report["val_psnr_db"]
    )
    from nas.data.encoders import psnr, reconstruct

    untrained, _ = psnr(reconstruct(before.eval(), shapes_images), shapes_images)
    trained, _ = psnr(reconstruct(vae, shapes_images), shapes_images)
    assert trained > untrained + 1.5  # 40 steps already learn the background colours
    with pytest.raises(NasError, match="not empty"):
        train_vae(shapes_images, tmp_path / "vae", config)
    with pytest.raises(NasError, match="norm_num_groups 8 does not divide"):
        VaeTrainConfig(block_out_channels=(12, 16)).check()


@pytest.mark.slow
def test_vae_train_on_2000_shapes_reaches_stated_quality(tmp_path):
    """docs/data.md states the default `nas vae train` quality on 2,000 shapes images."""
    from nas.data import shapes
    from nas.data.folders import load_images, open_source

    shapes.write(tmp_path / "shapes", n=2000)
    images = load_images(open_source(tmp_path / "shapes" / "train"), 32)[0]
    report = train_vae(images, tmp_path / "vae", VaeTrainConfig())
    assert report["val_psnr_db"] >= 27.5  # measured 27.97 dB
