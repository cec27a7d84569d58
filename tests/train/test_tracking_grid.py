"""`sample_every:` sends a sample grid to the tracker: TensorBoard's event file, read back, holds the
image `samples` at every sample_every-th step and the last, drawn by the sampler's own pipeline;
`cache_filter:` trains on the items whose records match."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from nas.cli import main
from nas.core.errors import NasError
from nas.train import TrainConfig
from nas.train.data import CacheSubset, select_items

ARCH = "search_spaces/archs/tiny_stock.yaml"
SETS = ["val_items=8", "val_timesteps=1", "batch_size=4", "warmup_steps=1", "ema=null", "log_every=1",
        "val_every=2", "report_to=tensorboard"]  # fmt: skip


def _images(folder) -> dict[int, np.ndarray]:
    """step -> the `samples` image of the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in {p.parent for p in folder.rglob("events.out.tfevents.*")}:  # the run, its hparams
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if "samples" in acc.Tags()["images"]:
            found[events] = acc
    (acc,) = found.values()
    return {e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in acc.Images("samples")}


def test_train_logs_a_sample_grid_every_sample_every_steps(sample_world, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "tiny", "--arch", ARCH, "--cache", str(sample_world.cache), "--out", str(run),
            "--max-steps", "5", "--quiet", "--set", *SETS, "sample_every=2"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    images = _images(run / "tracking")
    assert sorted(images) == [2, 4, 5]  # every 2 steps and the last
    grid = images[5]
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[1] > grid.shape[0]  # 4 cells in a row
    assert grid.std() > 0 and not np.array_equal(images[2], images[5])  # drawn, and by the trained U-Net


def test_sample_every_without_a_tracker_is_refused():
    with pytest.raises(ValueError, match="sample_every 2: sample grids go to the tracker"):
        TrainConfig.model_validate({"sample_every": 2})


def test_cache_filter_keeps_the_matching_items(sample_world):
    from nas.data.cache import open_cache

    cache = open_cache(sample_world.cache)
    shape = cache.records()[0]["objects"][0]["shape"]
    subset = select_items(cache, {"objects.shape": shape})
    assert isinstance(subset, CacheSubset) and 0 < len(subset) < len(cache)
    assert all(any(o["shape"] == shape for o in r["objects"]) for r in subset.records())
    assert subset.captions() == [r["text"] for r in subset.records()]
    first = subset.dataset(sample=False)[0]["latents"]
    assert np.array_equal(first.numpy(), cache.dataset(sample=False)[subset.indices[0]]["latents"].numpy())
    assert select_items(cache, None) is cache
    with pytest.raises(
        NasError, match=r"cache_filter: objects.shape: no item .* has 'hexagon' \(values found: "
    ):
        select_items(cache, {"objects.shape": "hexagon"})
