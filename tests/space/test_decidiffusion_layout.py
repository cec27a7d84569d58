"""DeciDiffusion 1.0's U-Net-NAS as a point of the format: `attention_layout: interleaved` and
`mid.resolution: half` (nas/space/schema.py), their model, cost, sampling and latency blocks."""

import pytest
import torch
import yaml

from nas.core.errors import NasError
from nas.cost.blocks import arch_blocks, space_blocks
from nas.cost.measure import arch_cost, count_params, example_inputs
from nas.models import FlexUNet2DConditionModel
from nas.space import (
    FLEX,
    arch_from_dict,
    arch_to_params,
    build_unet,
    canonical,
    load_arch,
    load_space,
    space_size,
    stock_config,
    unet_config,
)
from nas.space.build import interleave, layer_depths
from tests.cost.test_latency_table import _expected, _observed
from tests.fixtures.space import ARCHS, SPACES
from tests.space.test_space import assert_space_refused, enumerate_space

PUBLISHED_PARAMS = 814_746_884  # Deci/DeciDiffusion-v1-0, flexible_unet (huggingface.co)


def _v1():
    return load_arch(ARCHS / "decidiffusion_v1.yaml")


def test_decidiffusion_v1_has_exactly_the_published_parameter_count():
    arch = _v1()
    model = build_unet(arch, device="meta")
    assert isinstance(model, FlexUNet2DConditionModel)
    assert count_params(model) == PUBLISHED_PARAMS
    assert arch_cost(arch)["params"] == PUBLISHED_PARAMS  # the cost model agrees


def test_decidiffusion_v1_has_the_published_block_structure():
    """Deci's configuration, block by block: transformers per block (all single-layer), 5 mid
    ResNets, every down block downsampling, the mid block upsampling, up blocks [2, 3, 3] ResNets."""
    model = build_unet(_v1(), device="meta")
    down = [len(b.attentions) for b in model.down_blocks]
    up = [len(b.attentions) for b in model.up_blocks]
    assert (down, up) == ([0, 1, 3], [6, 3, 0])
    assert [len(b.resnets) for b in model.down_blocks] == [2, 2, 1]
    assert [len(b.resnets) for b in model.up_blocks] == [2, 3, 3]
    assert (len(model.mid_block.resnets), len(model.mid_block.attentions)) == (5, 2)
    assert all(b.downsamplers is not None for b in model.down_blocks)
    assert model.mid_block.upsamplers is not None
    assert [b.upsamplers is not None for b in model.up_blocks] == [True, True, False]
    depths = {len(t.transformer_blocks) for t in model.modules() if hasattr(t, "transformer_blocks")}
    assert depths == {1}


@pytest.mark.parametrize(
    ("total", "slots", "expected"),
    [
        (3, 1, [3]),
        (6, 2, [1, 5]),
        (3, 3, [1, 1, 1]),
        (1, 2, [1, 0]),
        (2, 5, [1, 1, 0, 0, 0]),
        (0, 3, [0, 0, 0]),
    ],
)
def test_interleave_is_decis_zip_longest(total, slots, expected):
    assert interleave(total, slots) == expected == layer_depths("interleaved", total, slots)


def _tiny_v1(**changes) -> dict:
    data = yaml.safe_load((ARCHS / "decidiffusion_v1.yaml").read_text())
    data["settings"] = {
        "latent_channels": 4,
        "latent_size": 16,
        "cross_attention_dim": 32,
        "text_len": 8,
        "norm_num_groups": 8,
    }
    for lv, channels in zip(data["levels"], [16, 32, 32]):
        lv["channels"] = channels
        if "heads" in lv:
            lv["heads"] = 2
    data.update(changes)
    return data


def test_tiny_v1_layout_trains_saves_and_loads(tmp_path):
    arch = arch_from_dict(_tiny_v1(), "tiny v1")
    torch.manual_seed(0)
    model = build_unet(arch)
    seen = []
    model.mid_block.resnets[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    sample, timestep, text = example_inputs(arch, batch=2)
    out = model(sample, timestep, text).sample
    assert out.shape == sample.shape
    assert seen == [16 // 2**3]  # the mid block works one resolution below the last level (4x4)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.save_pretrained(tmp_path)
    loaded = FlexUNet2DConditionModel.from_pretrained(tmp_path)
    assert loaded.config.single_layer_transformers and loaded.config.mid_block_half_resolution
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(sample, timestep, text).sample, model(sample, timestep, text).sample, rtol=0, atol=0
        )


@pytest.mark.parametrize("name", ["decidiffusion_v1", "tiny"])
def test_latency_blocks_follow_the_new_layout(name):
    """The blocks derived from the Arch alone are those the model runs, in order."""
    arch = _v1() if name == "decidiffusion_v1" else arch_from_dict(_tiny_v1(), "tiny v1")
    model = build_unet(arch, device="meta")
    seen = _observed(model)
    with torch.no_grad():
        model(*example_inputs(arch, 1, device="meta"))
    assert seen == _expected(arch)


def test_interleaved_with_at_most_one_layer_per_resnet_is_the_stock_model():
    """SD 1.5 has one layer per ResNet: both layouts build the same stock model."""
    data = yaml.safe_load((ARCHS / "sd15.yaml").read_text())
    stacked = arch_from_dict(data)
    interleaved = arch_from_dict({**data, "attention_layout": "interleaved"})
    assert stock_config(interleaved) is not None
    assert unet_config(interleaved) == unet_config(stacked)
    half = arch_from_dict({**data, "mid": {"resnets": 2, "attentions": 1, "resolution": "half"}})
    assert unet_config(half)[0] == FLEX  # the stock mid block has no resolution of its own


def test_default_keys_are_not_written():
    """Files written for points without the new keys stay as they were."""
    sd15 = load_arch(ARCHS / "sd15.yaml").to_data()
    assert "attention_layout" not in sd15 and "resolution" not in sd15["mid"]
    v1 = _v1().to_data()
    assert v1["attention_layout"] == "interleaved" and v1["mid"]["resolution"] == "half"
    assert arch_from_dict(v1) == _v1()


def test_space_with_both_layouts_and_mid_resolutions_is_counted_and_blocked_exactly(tiny_space):
    data = tiny_space.model_dump()
    data["attention_layout"] = ["stacked", "interleaved"]
    data["mid"]["resolution"] = ["same", "half"]
    data["levels"][0]["channels"] = [16]  # fewer points, same variety of blocks (a few seconds)
    space = type(tiny_space).model_validate(data)
    archs = enumerate_space(space)
    distinct = {yaml.safe_dump(canonical(a)) for a in archs}
    assert len(archs) == len(distinct) == space_size(space)
    assert {a.attention_layout for a in archs} == {"stacked", "interleaved"}
    assert {a.mid.resolution for a in archs if a.mid} == {"same", "half"}
    assert set().union(*(arch_blocks(a) for a in archs)) == space_blocks(space)


def test_decidiffusion_v1_is_a_point_of_the_decidiffusion_space():
    space = load_space(SPACES / "decidiffusion.yaml")
    params = arch_to_params(space, _v1(), "decidiffusion_v1.yaml")
    assert params["attention_layout"] == "interleaved" and params["mid.resolution"] == "half"


def test_a_layout_outside_the_space_is_refused(tiny_space):
    arch = arch_from_dict(
        {**load_arch(ARCHS / "tiny_stock.yaml").model_dump(), "attention_layout": "interleaved"}
    )
    with pytest.raises(
        NasError, match=r"attention_layout interleaved is outside the space \(allowed: stacked\)"
    ):
        arch_to_params(tiny_space, arch, "a.yaml")


GOOD = """
name: t
settings: {latent_channels: 4, latent_size: 8, cross_attention_dim: 32, text_len: 8, norm_num_groups: 8}
levels:
  - {channels: 16, resnets: 1, attentions: 1, up_attentions: 1, heads: 2}
  - {channels: 16, resnets: 1}
mid: {resnets: 1, attentions: 0, resolution: half}
"""

BAD_ARCH = [
    ("layout", GOOD + "attention_layout: zigzag\n", ["attention_layout", "'stacked' or 'interleaved'"]),
    (
        "resolution",
        GOOD.replace("resolution: half", "resolution: quarter"),
        ["mid.resolution", "'same' or 'half'"],
    ),
    ("mid key", GOOD.replace("resolution: half", "upsample: true"), ["mid.upsample", "unknown key"]),
    (
        "size",
        GOOD.replace("latent_size: 8", "latent_size: 2"),
        ["latent_size=2", "2**(levels)=4", "mid.resolution half"],
    ),
]


@pytest.mark.parametrize(("case", "text", "needles"), BAD_ARCH, ids=[c[0] for c in BAD_ARCH])
def test_bad_layout_values_in_architecture_files(write_yaml, case, text, needles):
    path = write_yaml(text)
    with pytest.raises(NasError) as info:
        load_arch(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            {"attention_layout": ["stacked", "stacked"]},
            ["attention_layout", "each choice once", "interleaved"],
        ),
        ({"attention_layout": []}, ["attention_layout", "at least one"]),
        ({"attention_layout": ["zigzag"]}, ["attention_layout.0", "'stacked' or 'interleaved'"]),
        ({"mid.resolution": ["half", "quarter"]}, ["mid.resolution.1", "'same' or 'half'"]),
        ({"mid.resolution": "half"}, ["mid.resolution", "list"]),
        (
            {"settings.latent_size": 2, "mid.resolution": ["same", "half"]},
            ["latent_size=2", "2**(depth.max)=4", "mid.resolution half"],
        ),
    ],
)
def test_bad_layout_values_in_space_files(write_yaml, overrides, needles):
    assert_space_refused(write_yaml, overrides, needles)
