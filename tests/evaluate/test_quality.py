"""`nas eval`: quality against steps on fixed validation prompts and seeds; JSON, plot and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from nas.cli import main
from nas.core.errors import NasError
from nas.evaluate.quality import evaluate_run, parse_steps, shapes_eval_set
from nas.sample import SampleSettings


def test_parse_steps():
    assert parse_steps("30,10,10, 50") == [10, 30, 50]
    for bad in ("", "ten", "0,10", "10,-1"):
        with pytest.raises(NasError, match="--steps"):
            parse_steps(bad)


def test_eval_prompts_are_the_datasets_validation_scenes(sample_world, stock_components):
    """Prompts, labels and reference images are those of DATA/validation: never trained on."""
    eval_set = shapes_eval_set(stock_components, n=3, seed=10)
    saved = [json.loads(line) for line in (sample_world.shapes / "validation" / "metadata.jsonl").open()]
    assert eval_set.kind == "shapes" and eval_set.seeds == [10, 11, 12]
    assert all(r["split"] == "validation" for r in eval_set.records)
    n = min(3, len(saved))
    assert [r["text"] for r in eval_set.records[:n]] == [r["text"] for r in saved[:n]]
    for image, record in zip(eval_set.reference[:n], saved[:n]):
        png = np.array(Image.open(sample_world.shapes / "validation" / record["file_name"]).convert("RGB"))
        assert torch.equal(image, torch.from_numpy(png).permute(2, 0, 1).float() / 255)
    trained = {r["text"] for r in stock_components.cache.records()}
    assert not trained & set(eval_set.prompts)


def test_nas_eval_writes_quality_against_steps(sample_world, tiny_evaluator, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(sample_world.run_stock),
        "--steps",
        "4,2",
        "--n",
        "6",
        "--evaluator",
        str(tiny_evaluator),
    ]
    assert main([*argv, "--out", str(out), "--quiet", "--batch-size", "3"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["steps"] == [2, 4] and report["kind"] == "shapes" and report["images"] == 6
    assert report["weights"] == "ema" and report["scheduler"] == "ddim" and report["guidance"] == 7.5
    assert "validation split" in report["prompts"]
    rows = report["results"]
    assert [r["steps"] for r in rows] == [2, 4]
    for row in rows:
        assert 0 <= row["alignment"] <= 1 and 0 <= row["chance_alignment"] <= 1
        attributes = {"shape", "colour", "size", "position", "background"}
        assert attributes <= set(row["alignment_by_attribute"]) and attributes <= set(
            row["chance_by_attribute"]
        )
        assert np.isfinite(row["frechet_distance"]) and row["frechet_distance"] >= 0
        assert row["images_per_s"] > 0 and row["split"]["images_per_s"] == pytest.approx(
            row["images_per_s"], abs=1e-3
        )
        assert row["split"]["unet_evals_per_image"] == 2 * row["steps"]  # CFG: 2 per step
    assert rows[-1]["rmse_to_max"] == 0 and rows[0]["rmse_to_max"] > 0  # 2 steps differ from 4
    ref = report["reference"]
    assert 0 <= ref["real_alignment"] <= 1 and ref["fd_real_floor"] >= 0
    assert 0 <= ref["vae_alignment"] <= 1 and ref["fd_vae"] >= 0
    assert Image.open(out / "quality_vs_steps.png").size[0] > 500
    assert (out / "grid_002.png").is_file() and (out / "grid_004.png").is_file()
    printed = capsys.readouterr().out
    assert "   2 steps: alignment" in printed and "chance" in printed and "images/s; text encoder" in printed


def test_same_seeds_give_the_same_numbers(sample_world, tiny_evaluator, tmp_path):
    settings = SampleSettings(steps=2, batch_size=4)
    first = evaluate_run(
        sample_world.run_stock, tmp_path / "a", [2], 4, settings, tiny_evaluator, progress=False
    )
    again = evaluate_run(
        sample_world.run_stock, tmp_path / "b", [2], 4, settings, tiny_evaluator, progress=False
    )
    assert first["results"][0]["frechet_distance"] == again["results"][0]["frechet_distance"]
    assert first["results"][0]["alignment"] == again["results"][0]["alignment"]


def test_eval_bad_input_is_one_line_exit_2(sample_world, tiny_evaluator, tmp_path, capsys):
    run = str(sample_world.run_stock)
    cases = [
        (["--steps", "0,10"], "--steps: every step count must be in 1..1000"),
        (
            ["--evaluator", str(tiny_evaluator), "--scheduler", "pndm"],
            "--scheduler: unknown value 'pndm' (allowed: ddim, dpmpp, euler, lcm)",
        ),
        ([], "pass --evaluator"),
        (["--evaluator", str(tmp_path)], "not an evaluator folder"),
        (["--evaluator", str(tiny_evaluator), "--n", "1"], "--n: Input should be greater than or equal to 2"),
    ]
    for extra, message in cases:
        assert main(["eval", run, "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any model-loading bars
        assert err.startswith("nas eval: error: ") and message in err, err
    no_weights = tmp_path / "run"
    no_weights.mkdir()
    shutil.copy(sample_world.run_stock / "config.yaml", no_weights)
    assert (
        main(["eval", str(no_weights), "--evaluator", str(tiny_evaluator), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no U-Net weights" in capsys.readouterr().err


def test_other_data_is_scored_on_the_held_out_items(sample_world, tmp_path):
    """A cache without shapes labels: prompts and reference images are the items the trainer held
    out (the last val_items), the Frechet floor as many training items just before them."""
    from nas.data.cache import open_cache
    from nas.evaluate.quality import held_out_eval_set, is_shapes
    from nas.sample import load_run
    from tests.fixtures.data import strip_shapes_labels

    cache = tmp_path / "cache"
    shutil.copytree(sample_world.cache, cache)
    plain = strip_shapes_labels(cache)
    run = tmp_path / "run"
    shutil.copytree(sample_world.run_stock / "final", run / "final")
    config = (sample_world.run_stock / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(sample_world.cache), str(cache)))
    assert not is_shapes(open_cache(cache))
    eval_set = held_out_eval_set(load_run(run), n=4, seed=0)
    assert eval_set.kind == "held_out" and len(eval_set.reference) == 4
    assert eval_set.prompts == [r["text"] for r in plain[-8:][:4]]
    assert eval_set.floor is not None and len(eval_set.floor) == 4
    first = plain[-12]  # the floor's first image: the training item 4 before the held-out block
    png = np.array(Image.open(sample_world.shapes / "train" / first["file_name"]).convert("RGB"))
    assert torch.equal(eval_set.floor[0], torch.from_numpy(png).permute(2, 0, 1).float() / 255)
