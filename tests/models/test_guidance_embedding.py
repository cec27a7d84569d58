"""The guidance embedding (settings.time_cond_proj_dim, `timestep_cond`): diffusers' formula, both
U-Net classes, the architecture format and the cost model."""

from __future__ import annotations

import re

import pytest
import torch

from nas.core.errors import NasError
from nas.cost.measure import arch_cost, example_inputs, guidance_input
from nas.models import FlexUNet2DConditionModel
from nas.models.guidance import guidance_embedding
from nas.space import arch_from_dict, build_unet, load_arch, unet_config
from nas.teacher.arch import arch_from_unet_config
from tests.fixtures.space import ARCHS

DIM = 16  # a tiny guidance embedding (LCM: 256)


def with_guidance(name: str, dim: int | None = DIM):
    arch = load_arch(ARCHS / f"{name}.yaml")
    data = arch.to_data()
    data["settings"]["time_cond_proj_dim"] = dim
    return arch_from_dict(data)


@pytest.mark.parametrize("dim", [4, 7, 256])
def test_embedding_is_diffusers_get_guidance_scale_embedding(dim):
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline,
    )

    w = torch.tensor([0.0, 1.0, 6.5, 14.0])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_embedding(w, dim), theirs)
    # by hand: w = 1, first frequency 1: sin(1000), cos(1000)
    one = guidance_embedding(torch.tensor([1.0]), 4)[0]
    assert one[0].item() == pytest.approx(torch.sin(torch.tensor(1000.0)).item(), abs=1e-6)
    assert one[2].item() == pytest.approx(torch.cos(torch.tensor(1000.0)).item(), abs=1e-6)


def test_embedding_refuses_bad_shapes():
    with pytest.raises(ValueError, match="one weight per sample"):
        guidance_embedding(torch.ones(2, 1), 8)
    with pytest.raises(ValueError, match="at least two frequencies"):
        guidance_embedding(torch.ones(2), 2)


@pytest.mark.parametrize("name", ["tiny_stock", "tiny_flex"])
def test_both_classes_take_timestep_cond(name):
    arch = with_guidance(name)
    class_name, config = unet_config(arch)
    assert config["time_cond_proj_dim"] == DIM and class_name == type(build_unet(arch)).__name__
    torch.manual_seed(0)
    net = build_unet(arch).eval()
    assert tuple(net.time_embedding.cond_proj.weight.shape) == (arch.levels[0].channels, DIM)
    torch.nn.init.normal_(net.time_embedding.cond_proj.weight)  # as after training: w matters
    x, t, text = example_inputs(arch, batch=2)
    with torch.no_grad():
        low = net(x, t, text, timestep_cond=guidance_embedding(torch.tensor([1.0, 1.0]), DIM)).sample
        high = net(x, t, text, timestep_cond=guidance_embedding(torch.tensor([9.0, 9.0]), DIM)).sample
        plain = net(x, t, text).sample  # without timestep_cond: cond_proj unused, as in diffusers
    assert not torch.allclose(low, high) and not torch.allclose(low, plain)


def test_flex_with_stock_weights_computes_what_stock_computes_with_timestep_cond():
    """Same module names: a stock state dict with cond_proj loads strictly into the flex class."""
    arch = with_guidance("tiny_stock")
    torch.manual_seed(0)
    stock = build_unet(arch).eval()
    torch.nn.init.normal_(stock.time_embedding.cond_proj.weight)
    flex = build_unet(arch, force_flex=True).eval()
    assert isinstance(flex, FlexUNet2DConditionModel)
    flex.load_state_dict(stock.state_dict(), strict=True)
    x, t, text = example_inputs(arch, batch=2)
    cond = guidance_embedding(torch.tensor([2.0, 11.0]), DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            flex(x, t, text, timestep_cond=cond).sample, stock(x, t, text, timestep_cond=cond).sample
        )


def test_flex_without_embedding_refuses_timestep_cond():
    arch = load_arch(ARCHS / "tiny_flex.yaml")
    net = build_unet(arch)
    x, t, text = example_inputs(arch)
    with pytest.raises(ValueError, match="no time_cond_proj_dim"):
        net(x, t, text, timestep_cond=torch.zeros(1, DIM))


@pytest.mark.parametrize("name", ["tiny_stock", "tiny_flex"])
def test_cost_counts_the_guidance_projection(name):
    plain, guided = load_arch(ARCHS / f"{name}.yaml"), with_guidance(name)
    c0 = plain.levels[0].channels
    a, b = arch_cost(plain, batch=2), arch_cost(guided, batch=2)
    assert b["params"] - a["params"] == DIM * c0  # cond_proj: a bias-free Linear DIM -> c0
    assert b["macs"] - a["macs"] == 2 * DIM * c0  # one row per sample of the batch
    assert guidance_input(plain) is None and guidance_input(guided, batch=3).shape == (3, DIM)


@pytest.mark.parametrize("name", ["tiny_stock", "tiny_flex"])
def test_architecture_format_round_trips_the_key(name, tmp_path):
    arch = with_guidance(name)
    assert arch.to_data()["settings"]["time_cond_proj_dim"] == DIM
    assert (
        "time_cond_proj_dim" not in load_arch(ARCHS / f"{name}.yaml").to_data()["settings"]
    )  # files unchanged
    net = build_unet(arch)
    net.save_config(tmp_path)
    back = arch_from_unet_config(dict(net.config), name=arch.name)  # a saved U-Net read as a teacher
    assert back.settings.time_cond_proj_dim == DIM and unet_config(back) == unet_config(arch)


@pytest.mark.parametrize(
    ("value", "message"), [(2, "greater than or equal to 4"), (10**6, "less than or equal to 8192")]
)
def test_out_of_range_width_is_one_line(write_yaml, value, message):
    from nas.space import load_arch as load

    path = write_yaml(
        f"settings: {{time_cond_proj_dim: {value}}}\nlevels: [{{channels: 32, resnets: 1}}]\nmid: null\n"
    )
    with pytest.raises(
        NasError, match=re.escape(f"settings.time_cond_proj_dim: Input should be {message}")
    ) as info:
        load(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))
