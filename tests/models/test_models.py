"""Every architecture builds a diffusers-native U-Net that trains, saves and loads, and runs in a
diffusers pipeline."""

import pytest
import torch

from nas.cost.measure import count_params, example_inputs
from nas.models import FlexUNet2DConditionModel
from nas.space import STOCK, arch_from_dict, build_unet, load_arch, unet_class, unet_config
from tests.fixtures.space import ARCHS, distinct_tiny_archs

TINY = distinct_tiny_archs()  # the 50 seeded draws of tiny.yaml without repeats, plus two hand-written
NAMES = [a.name for a in TINY]
STOCK_ARCHS = [a for a in TINY if unet_config(a)[0] == STOCK]


def test_tiny_space_draws_cover_both_classes(tiny_archs):
    classes = {unet_config(a)[0] for a in tiny_archs}
    assert classes == {"UNet2DConditionModel", "FlexUNet2DConditionModel"}


@pytest.mark.parametrize("arch", TINY, ids=NAMES)
def test_every_tiny_arch_trains_saves_and_loads(arch, tmp_path):
    torch.manual_seed(0)
    model = build_unet(arch)
    sample, timestep, text = example_inputs(arch, batch=2)
    out = model(sample, timestep, text).sample
    assert out.shape == sample.shape
    out.pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    class_name, _ = unet_config(arch)
    loaded = unet_class(class_name).from_pretrained(tmp_path)
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(sample, timestep, text).sample, model(sample, timestep, text).sample, rtol=0, atol=0
        )


def test_sd15_has_exactly_the_published_parameter_count():
    arch = load_arch(ARCHS / "sd15.yaml")
    assert count_params(build_unet(arch, device="meta")) == 859_520_964


def test_sd15_in_the_flex_class_has_the_published_parameter_count():
    arch = load_arch(ARCHS / "sd15.yaml")
    assert count_params(build_unet(arch, force_flex=True, device="meta")) == 859_520_964


def test_stock_expressible_draws_exist():
    assert len(STOCK_ARCHS) >= 5


@pytest.mark.parametrize("arch", STOCK_ARCHS, ids=[a.name for a in STOCK_ARCHS])
def test_flex_class_computes_what_stock_computes_with_the_stock_weights(arch):
    """Same blocks, same wiring, same module names: the stock model's state dict loads into the flex
    class as is (strict), and both give the same output. The stock weights are perturbed first so
    that no parameter keeps its default (GroupNorm's ones and zeros would hide a swapped name)."""
    torch.manual_seed(0)
    stock, flex = build_unet(arch).eval(), build_unet(arch, force_flex=True).eval()
    assert isinstance(flex, FlexUNet2DConditionModel) and not isinstance(stock, FlexUNet2DConditionModel)
    with torch.no_grad():
        for p in stock.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sample, timestep, text = example_inputs(arch, batch=2)
    with torch.no_grad():
        before = flex(sample, timestep, text).sample
        flex.load_state_dict(stock.state_dict(), strict=True)
        expected, got = stock(sample, timestep, text).sample, flex(sample, timestep, text).sample
    assert not torch.allclose(before, expected, atol=1e-3)  # the loaded weights are what matched
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_flex_model_supports_masks_and_controlnet_residuals():
    arch = load_arch(ARCHS / "tiny_flex.yaml")
    model = build_unet(arch).eval()
    sample, timestep, text = example_inputs(arch, batch=2)
    mask = torch.ones(2, text.shape[1], dtype=torch.long)
    with torch.no_grad():
        base = model(sample, timestep, text).sample
        same = model(sample, timestep, text, encoder_attention_mask=mask).sample
        mask[:, 4:] = 0
        masked = model(sample, timestep, text, encoder_attention_mask=mask).sample
        assert torch.allclose(base, same, atol=1e-5)
        assert not torch.allclose(base, masked, atol=1e-5)
        # ControlNet-style residuals: zeros change nothing
        skips = _skip_shapes(model, sample, timestep, text)
        zero = model(
            sample,
            timestep,
            text,
            down_block_additional_residuals=tuple(torch.zeros(s) for s in skips),
            mid_block_additional_residual=torch.zeros(2, 32, 4, 4),
        ).sample
        assert torch.allclose(base, zero, atol=1e-6)


def _skip_shapes(model, sample, timestep, text):
    shapes = [model.conv_in(sample).shape]
    hidden = model.conv_in(sample)
    emb = model._time_embedding(sample, timestep)
    for block in model.down_blocks:
        hidden, outputs = block(hidden, emb, text)
        shapes += [o.shape for o in outputs]
    return shapes


def test_flex_unet_runs_in_stable_diffusion_pipeline_and_reloads(tmp_path):
    """The project's class drops into diffusers' StableDiffusionPipeline and round-trips through
    save_pretrained / from_pretrained as a pipeline component."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    arch = load_arch(ARCHS / "tiny_flex.yaml").model_copy(deep=True)
    arch.settings.cross_attention_dim = 32
    arch.settings.text_len = 16
    unet = build_unet(arch)
    assert isinstance(unet, FlexUNet2DConditionModel)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    tokenizer = _tiny_clip_tokenizer(tmp_path, CLIPTokenizer)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np")
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == (1, 32, 32, 3)
    pipe.save_pretrained(tmp_path / "pipe")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(again.unet, FlexUNet2DConditionModel)
    image2 = again("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(image - image2).max() < 1e-5


def _tiny_clip_tokenizer(tmp_path, cls):
    """A real CLIP BPE tokenizer over a 1,000-token toy vocabulary, saved and loaded from disk."""
    import json

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return cls(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


@pytest.mark.parametrize(
    "name", ["sd15", "decidiffusion_v1", "quickstart_baseline", "tiny_stock", "tiny_flex"]
)
def test_shipped_archs_build_on_meta(name):
    arch = load_arch(ARCHS / f"{name}.yaml")
    model = build_unet(arch, device="meta")
    assert count_params(model) > 0


@pytest.mark.parametrize("force_flex", [False, True])
def test_mid_block_attention_uses_lowest_level_heads(force_flex):
    """A head count that does not divide the channels would silently shrink attention in
    diffusers; the mid block must take the lowest level's own (validated) heads."""
    arch = load_arch(ARCHS / "quickstart_baseline.yaml")  # lowest level: 128 ch, head_dim 32, no attention
    model = build_unet(arch, force_flex=force_flex, device="meta")
    mid_attention = model.mid_block.attentions[0].transformer_blocks[0].attn1
    assert mid_attention.heads == 128 // 32 and mid_attention.inner_dim == 128


@pytest.mark.parametrize("layers, stock", [(1, True), (2, False), (3, False)])
def test_a_two_resnet_mid_block_puts_its_second_layer_after_the_second_resnet(layers, stock):
    """`attentions: A` in a 2-ResNet mid block means spread(A, 2) layers after each ResNet in every
    class: diffusers' cross-attention mid block (one transformer, after the first ResNet) expresses
    only A = 1, so A >= 2 builds the flex class rather than a differently wired stock model."""
    data = load_arch(ARCHS / "tiny_stock.yaml").to_data()
    data["mid"] = {"resnets": 2, "attentions": layers}
    for lv in data["levels"]:  # transformers as deep as the mid block's first one (stock's rule)
        lv["attentions"], lv["up_attentions"] = lv["resnets"] * (layers + 1) // 2, 0
    arch = arch_from_dict(data)
    assert (unet_config(arch)[0] == STOCK) is stock
    model = build_unet(arch, device="meta")
    depths = [len(a.transformer_blocks) for a in model.mid_block.attentions]
    assert depths == [d for d in ((layers + 1) // 2, layers // 2) if d]


@pytest.mark.parametrize("force_flex", [False, True], ids=["stock", "flex"])
def test_gradient_checkpointing_gives_the_same_gradients(force_flex):
    """`gradient_checkpointing: true` in a train config recomputes activations in backward: the
    gradients must equal those of a plain backward pass (stock and flex classes)."""
    arch = load_arch(ARCHS / "tiny_stock.yaml")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_unet(arch, force_flex=force_flex)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        sample, timestep, text = example_inputs(arch, batch=2)
        model(sample, timestep, text).sample.pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.is_gradient_checkpointing
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-6)
