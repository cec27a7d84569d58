"""`report_to:` sends metrics.csv's columns to accelerate's trackers: TensorBoard's event files, read
back, hold the same scalars at the same steps; a search's proxy runs log one run per trial; a
tracker whose package is missing is one line before anything trains."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from nas.cli import main
from nas.core.errors import NasError
from nas.train import train
from nas.train.loop import proxy_train


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in folder.rglob("events.out.tfevents.*") if "loss" in _tags(p.parent)}
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _tags(folder) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc.Tags()["scalars"]


def test_tensorboard_holds_what_metrics_csv_holds(fake_cache, tiny_unet, quick_config, tmp_path):
    config = quick_config(max_steps=4, log_every=2, val_every=2, report_to="tensorboard", ema=None)
    run = tmp_path / "run"
    train(tiny_unet(), fake_cache, config, out=run, quiet=True)
    logged = scalars(run / "tracking" / "run")
    with open(run / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["step"] != "0"]
    for column in ("loss", "val_loss", "lr", "samples_per_s"):
        expected = [(int(r["step"]), float(r[column])) for r in rows if r[column]]
        assert [s for s, _ in logged[column]] == [s for s, _ in expected] == [2, 4]
        assert [v for _, v in logged[column]] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_proxy_runs_log_one_run_per_trial(search_cache, tmp_path):
    from nas.search.objective import proxy_config
    from nas.space import load_arch
    from tests.fixtures.space import ARCHS

    config = proxy_config(_space()).model_copy(update={"report_to": "tensorboard", "val_items": 8})
    arch = load_arch(ARCHS / "tiny_stock.yaml").model_copy(update={"name": "study-t3"})
    proxy_train(arch, search_cache, 2, config=config, every=2, tracking=tmp_path / "tracking")
    assert [p.name for p in (tmp_path / "tracking").iterdir()] == ["study-t3"]
    assert [s for s, _ in scalars(tmp_path / "tracking")["val_loss"]] == [2]


def _space():
    from nas.space import load_space
    from tests.fixtures.space import SPACES

    return load_space(SPACES / "tiny.yaml")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_one_line(
    fake_cache, tiny_unet, quick_config, tmp_path, write_yaml, capsys
):
    config = quick_config(max_steps=2, report_to="wandb")
    with pytest.raises(NasError, match=r"report_to: wandb needs the wandb package, which is not installed"):
        train(tiny_unet(), fake_cache, config, out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    path = write_yaml("preset: tiny\nreport_to: wandb\n")
    code = main(["train", str(path), "--arch", "search_spaces/archs/tiny_stock.yaml", "--cache", "nowhere",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install wandb torch==" in err[0]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_runs_offline_without_an_account(fake_cache, tiny_unet, quick_config, tmp_path, monkeypatch):
    """No WANDB_API_KEY and no WANDB_MODE: an offline run under RUN/tracking/wandb, nothing uploaded
    (accelerate's WandBTracker gives its first argument to wandb.init as the project: passing
    `project=` again was a TypeError)."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = quick_config(max_steps=2, log_every=1, val_every=2, report_to="wandb", ema=None)
    run = tmp_path / "run"
    train(tiny_unet(), fake_cache, config, out=run, quiet=True)
    (offline,) = (run / "tracking" / "wandb").glob("offline-run-*")
    (history,) = offline.glob("run-*.wandb")
    assert b"val_loss" in history.read_bytes() and b"samples_per_s" in history.read_bytes()
