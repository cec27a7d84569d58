"""Shapes evaluator: alignment scoring, label coding, Frechet distance, training, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nas.core.errors import NasError
from nas.data import shapes
from nas.evaluate import shapes_evaluator as ev

RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "small", "position": "top left"}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "size": "large", "position": "bottom"}
TINY = dict(
    channels=(16, 32, 64), feature_dim=128, train_images=1200, steps=120, batch_size=32, val_images=200
)


def _scene(*objects, background="white"):
    return {"objects": list(objects), "background": background}


def test_perfect_prediction_scores_one():
    scene = _scene(RED_CIRCLE, BLUE_SQUARE)
    assert ev.alignment_report([scene], [scene])["alignment"] == 1.0


def test_each_wrong_attribute_costs_its_share():
    prompted = _scene(RED_CIRCLE, BLUE_SQUARE)  # 2 objects x 4 attributes + background = 9
    wrong_colour = _scene({**RED_CIRCLE, "colour": "green"}, BLUE_SQUARE)
    assert ev.alignment_report([wrong_colour], [prompted])["alignment"] == pytest.approx(8 / 9)
    moved = _scene({**RED_CIRCLE, "position": "centre"}, BLUE_SQUARE)
    report = ev.alignment_report([moved], [prompted])
    assert report["position"] == 0.5 and report["shape"] == 1.0  # drawn elsewhere still counts as drawn
    dark = _scene(RED_CIRCLE, BLUE_SQUARE, background="black")
    assert ev.alignment_report([dark], [prompted])["background"] == 0.0


def test_one_drawn_object_cannot_satisfy_two_prompted():
    prompted = _scene(RED_CIRCLE, {**RED_CIRCLE, "position": "top right"})
    only_one = _scene(RED_CIRCLE)
    assert ev.alignment_report([only_one], [prompted])["alignment"] == pytest.approx(5 / 9)
    assert ev.alignment_report([_scene()], [prompted])["alignment"] == pytest.approx(1 / 9)


def test_targets_decode_round_trip():
    records = [shapes.sample(i, seed=0)[1] for i in range(30)]
    y = ev.targets(records)
    logits = {
        "shape": torch.nn.functional.one_hot(y["shape"], ev.N_SHAPE).float(),
        "colour": torch.nn.functional.one_hot(y["colour"].clamp(min=0), ev.N_COLOUR).float(),
        "size": torch.nn.functional.one_hot(y["size"].clamp(min=0), ev.N_SIZE).float(),
        "background": torch.nn.functional.one_hot(y["background"], ev.N_BG).float(),
    }
    for got, want in zip(ev.decode(logits), records):
        assert got == {"objects": want["objects"], "background": want["background"]}


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4 I) in 3-d: |m|^2 + 3 * (1 + 4 - 2 * 2) = |m|^2 + 3.
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 0.0, 2.0])
    assert ev.frechet_distance(a, b) == pytest.approx(5.0 + 3.0, rel=0.08)
    with pytest.raises(NasError, match="feature sets"):
        ev.frechet_distance(a, a[:, :2])


def test_short_training_learns_and_round_trips(tmp_path):
    config = ev.EvaluatorConfig(**TINY)
    evaluator, metrics = ev.train_evaluator(config)
    val_images, val_records = ev.generated(config.val_images, config, "validation")
    torch.manual_seed(config.seed)
    untrained = ev.Evaluator(ev.ShapesClassifier(config), config).report(val_images, val_records)
    assert evaluator.alignment(val_images, val_records) == pytest.approx(metrics["val_alignment"])
    # 120 steps learn background, colour, size and where objects are (shapes need the full run).
    assert metrics["val_alignment"] > untrained["alignment"] + 0.15
    assert metrics["val_accuracy"]["background"] > 0.9  # chance 1/3
    assert metrics["val_extra_objects"] < 0.5 < untrained["extra_objects"]
    ev.save_evaluator(evaluator, tmp_path / "eval")
    assert (
        json.loads((tmp_path / "eval" / ev.CONFIG).read_text())["metrics"]["val_alignment"]
        == metrics["val_alignment"]
    )
    loaded = ev.load_evaluator(tmp_path / "eval")
    images, records = ev.generated(16, config, "validation")
    assert torch.equal(loaded.features(images), evaluator.features(images))
    assert loaded.features(images).shape == (16, 128)
    assert loaded.alignment(images, records) == evaluator.alignment(images, records)
    # Other image sizes are resized to the evaluator's resolution.
    big = torch.nn.functional.interpolate(images, size=(64, 64), mode="nearest")
    assert loaded.features(big).shape == (16, 128)
    with pytest.raises(NasError, match=r"expected images \[B, 3, H, W\]"):
        loaded.features(images[:, :1])


def test_load_evaluator_errors(tmp_path):
    with pytest.raises(NasError, match="not an evaluator folder"):
        ev.load_evaluator(tmp_path)
    config = ev.EvaluatorConfig(**TINY)
    ev.save_evaluator(ev.Evaluator(ev.ShapesClassifier(config), config), tmp_path / "e")
    doc = json.loads((tmp_path / "e" / ev.CONFIG).read_text())
    doc["vocabulary"]["shapes"] = ["blob"]
    (tmp_path / "e" / ev.CONFIG).write_text(json.dumps(doc))
    with pytest.raises(NasError, match="another shapes vocabulary"):
        ev.load_evaluator(tmp_path / "e")
    doc["config"]["colour_depth"] = 3
    (tmp_path / "e" / ev.CONFIG).write_text(json.dumps(doc))
    with pytest.raises(NasError, match="colour_depth: unknown key"):
        ev.load_evaluator(tmp_path / "e")


def test_cli_train_evaluator_dry_run_and_refusal(tmp_path, capsys):
    from nas.cli import main

    assert main(["data", "train-evaluator", "--out", str(tmp_path / "e"), "--dry-run", "--steps", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 7
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    assert main(["data", "train-evaluator", "--out", str(tmp_path / "busy"), "--steps", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "x").read_text() == "keep"


@pytest.mark.slow
def test_default_evaluator_reaches_stated_accuracy():
    """docs/data.md states the default evaluator's validation accuracy; this checks it."""
    _, metrics = ev.train_evaluator(ev.EvaluatorConfig())
    assert metrics["val_alignment"] >= 0.98
    assert min(metrics["val_accuracy"].values()) >= 0.95


def test_frechet_distance_of_few_images_is_silent_and_matches_the_closed_form():
    """Fewer images than feature dimensions (rank-deficient covariances, as `nas eval --n 8`):
    no LinAlgWarning reaches the user, and identical sets are at distance ~0."""
    import warnings

    import torch

    from nas.evaluate.shapes_evaluator import frechet_distance

    feats = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = frechet_distance(feats, feats)
        shifted = frechet_distance(feats, feats + 1.0)
    # ||mu shift||^2 = 32 x 1^2; the root of a rank-7 product is exact to ~1e-6 of the trace (~30)
    assert abs(same) < 1e-4 and shifted == pytest.approx(32.0, abs=1e-4)
