"""`lora:` training mode: the base run frozen, only the adapter trained, saved in diffusers' LoRA format;
the same tests for the stock class and FlexUNet2DConditionModel."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from nas.core.errors import NasError
from nas.train import load_config
from nas.train.loop import train_arch
from nas.train.lora import LORA_INFO, LORA_WEIGHTS
from tests.fixtures.sample import KINDS, resumed_addon_runs

COMMON = ["val_items=8", "val_timesteps=1", "batch_size=4", "lr=1e-2", "lr_schedule=constant", "ema=null",
          "checkpoint_every=2", "log_every=1"]  # fmt: skip


def _config(base_run, steps, extra=()):
    return load_config("tiny", [*COMMON, f"lora.init_from={base_run}", *extra], max_steps=steps)


@pytest.fixture(scope="module")
def lora_runs(sample_world, tmp_path_factory):
    """kind -> (4 uninterrupted steps, 2 steps then resumed to 4) run folders."""
    return {kind: resumed_addon_runs(sample_world, tmp_path_factory.mktemp(f"lora_{kind}"),
                                      partial(_config, sample_world.run(kind))) for kind in KINDS}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_lora_run_trains_only_the_adapter_and_loads_in_a_diffusers_pipeline(sample_world, lora_runs, kind):
    from nas.sample import build_pipeline, load_run

    run, _ = lora_runs[kind]
    weights = load_file(run / LORA_WEIGHTS)
    assert weights and all(k.startswith("unet.") and ".lora_" in k for k in weights)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())  # trained
    assert not (run / "final").exists()  # no full U-Net copy
    info = json.loads((run / LORA_INFO).read_text())
    assert info["rank"] == 4 and info["alpha"] == 4 and info["base_unet_class"] in {
        "UNet2DConditionModel", "FlexUNet2DConditionModel"}  # fmt: skip
    lora_params = sum(v.numel() for v in weights.values())
    assert info["trainable_params"] == lora_params
    assert 0 < info["trainable_share"] == pytest.approx(lora_params / info["total_params"])

    components = load_run(sample_world.run(kind))
    before = {n: p.clone() for n, p in components.unet.named_parameters()}
    pipe = build_pipeline(components)
    pipe.load_lora_weights(run)
    adapted = dict(pipe.unet.named_parameters())
    for name, p in before.items():  # the base is what init_from saved: frozen
        key = name if name in adapted else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")  # fmt: skip
        assert torch.equal(adapted[key], p), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val_loss"] != summary["val_loss_start"]


@pytest.mark.parametrize("kind", KINDS)
def test_lora_resume_ends_with_identical_weights(lora_runs, kind):
    full, resumed = lora_runs[kind]
    a, b = load_file(full / LORA_WEIGHTS), load_file(resumed / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_config_errors_are_one_line(sample_world, tmp_path):
    with pytest.raises(NasError, match="lora: needs ema: null"):
        load_config("tiny", [f"lora.init_from={sample_world.run_stock}"])
    with pytest.raises(NasError, match="init_from"):
        load_config("tiny", ["ema=null", "lora.rank=8"])
    with pytest.raises(NasError, match=r"lora.init_from .*: no arch.yaml"):
        train_arch(_config(tmp_path, 1), cache_path=sample_world.cache, out=tmp_path / "r", quiet=True)
    config = _config(sample_world.run_stock, 1, ["lora.target_modules=[no_such_proj]"])
    with pytest.raises(NasError, match=r"lora.target_modules \['no_such_proj'\]: .*to_q"):
        train_arch(config, cache_path=sample_world.cache, out=tmp_path / "r2", quiet=True)
