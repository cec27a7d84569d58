"""`controlnet:` training mode: the base run's U-Net frozen, only the ControlNet trained on re-drawn
shapes conditions, saved as a diffusers ControlNet folder; resumed runs end with identical weights.
The same tests for the stock class and FlexUNet2DConditionModel."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nas.core.errors import NasError
from nas.train import load_config
from nas.train.controlnet import CONTROLNET_DIR, CONTROLNET_INFO
from tests.fixtures.sample import KINDS, resumed_addon_runs

COMMON = ["val_items=8", "val_timesteps=1", "batch_size=4", "lr=1e-3", "lr_schedule=constant", "ema=null",
          "checkpoint_every=2", "log_every=1", "warmup_steps=0"]  # fmt: skip
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _config(base_run, steps, extra=()):
    return load_config("tiny", [*COMMON, f"controlnet.init_from={base_run}", *extra], max_steps=steps)


@pytest.fixture(scope="module")
def controlnet_runs(sample_world, tmp_path_factory):
    """kind -> (4 uninterrupted steps, 2 steps then resumed to 4) run folders."""
    return {kind: resumed_addon_runs(sample_world, tmp_path_factory.mktemp(f"controlnet_{kind}"),
                                      partial(_config, sample_world.run(kind))) for kind in KINDS}  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_controlnet_run_trains_only_the_controlnet_and_saves_a_diffusers_folder(
    sample_world, controlnet_runs, kind
):
    from diffusers import ControlNetModel

    from nas.sample import load_run
    from nas.sample.controlnet import check_controlnet_fits, load_controlnet

    run, _ = controlnet_runs[kind]
    folder = run / CONTROLNET_DIR
    assert (folder / WEIGHTS).is_file() and not list(folder.glob("*.bin"))
    assert not (run / "final").exists()  # no copy of the frozen U-Net
    assert {p.name for p in folder.glob("*.py")} == (
        {"flex_controlnet.py", "flex_unet.py"} if kind == "flex" else set()
    )
    controlnet = load_controlnet(folder)
    assert isinstance(controlnet, ControlNetModel)
    assert any(p.abs().max() > 0 for p in controlnet.controlnet_down_blocks.parameters())  # trained
    base = load_run(sample_world.run(kind))
    check_controlnet_fits(controlnet, base.unet, "cn")
    info = json.loads((run / CONTROLNET_INFO).read_text())
    assert info["condition"] == "mask" and info["dataset_seed"] == 0 and info["resolution"] == 32
    assert info["base_unet_class"] == type(base.unet).__name__
    # the frozen U-Net in the last checkpoint is the base run's, bit for bit
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    state = load_file(next(ckpt.glob("model*.safetensors")))
    unet = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    raw = load_run(sample_world.run(kind), weights=info["base_weights"]).unet.state_dict()
    assert unet.keys() == raw.keys() and all(torch.equal(unet[k], raw[k]) for k in raw)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val_loss"] != summary["val_loss_start"]


@pytest.mark.parametrize("kind", KINDS)
def test_controlnet_resume_ends_with_identical_weights(controlnet_runs, kind):
    full, resumed = controlnet_runs[kind]
    a, b = load_file(full / CONTROLNET_DIR / WEIGHTS), load_file(resumed / CONTROLNET_DIR / WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conditions_are_redrawn_where_the_image_has_its_objects(sample_world):
    from PIL import Image

    from nas.data.cache import open_cache
    from nas.data.conditions import CacheConditions

    cache = open_cache(sample_world.cache)
    masks, edges = CacheConditions(cache, "mask"), CacheConditions(cache, "edges")
    for i in (0, 3, 7):
        record = cache.records()[i]
        image = np.asarray(Image.open(sample_world.shapes / "train" / record["file_name"])).reshape(-1, 3)
        mask = masks[i].numpy()  # [3, H, W] in [0, 1], white on black
        assert mask.shape == (3, 32, 32) and set(np.unique(mask[0])) - {0.0, 1.0}  # anti-aliased edges
        covered = mask[0].reshape(-1)
        # exactly where the image has them: uncovered pixels are all the one background colour, fully
        # covered ones the objects' colours, and only the partly covered ones blend the two
        assert len(np.unique(image[covered == 0], axis=0)) == 1
        assert 1 <= len(np.unique(image[covered == 1], axis=0)) <= len(record["objects"])
        background = np.unique(image[covered == 0], axis=0)[0]
        assert (image[(covered > 0) & (covered < 1)] != background).any(-1).all()
    assert np.unique(masks[3].numpy()[0]).size > 2 and not np.array_equal(masks[3], masks[7])
    edge, fill = edges[3].numpy()[0], masks[3].numpy()[0]
    assert 0 < (edge > 0.5).sum() < (fill > 0.5).sum()  # outlines: fewer pixels than the fill
    assert ((edge > 0) <= (fill > 0)).all()  # and inside it


def test_a_cache_without_a_condition_source_is_one_line(sample_world, tmp_path):
    from nas.data.cache import open_cache
    from nas.data.conditions import CacheConditions

    cache = open_cache(sample_world.cache)

    class Moved:  # the cache's source (and its shapes.json) gone
        path, manifest = tmp_path / "cache", {**cache.manifest, "source": {"path": str(tmp_path / "gone")}}

        def records(self):
            return cache.records()

    with pytest.raises(
        NasError, match=r"cache: no condition source: the shapes dataset's shapes.json .* not found"
    ):
        CacheConditions(Moved(), "mask")

    class Own(Moved):  # a user's own captioned folder: no shapes labels
        def records(self):
            return [{"text": "a photo", "file_name": "a.png", "source_index": 0}]

    with pytest.raises(
        NasError, match=r"cache: no condition source: its records.jsonl holds no shapes labels"
    ):
        CacheConditions(Own(), "mask")


def test_controlnet_config_errors_are_one_line(sample_world):
    with pytest.raises(NasError, match="controlnet: needs ema: null"):
        load_config("tiny", [f"controlnet.init_from={sample_world.run_stock}"])
    with pytest.raises(NasError, match="controlnet: with lora: or distill:"):
        load_config("tiny", ["ema=null", f"controlnet.init_from={sample_world.run_stock}",
                             f"lora.init_from={sample_world.run_stock}"])  # fmt: skip
    with pytest.raises(NasError, match="condition"):
        load_config(
            "tiny",
            ["ema=null", f"controlnet.init_from={sample_world.run_stock}", "controlnet.condition=depth"],
        )
