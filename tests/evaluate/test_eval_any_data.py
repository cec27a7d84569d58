"""`nas eval` on data that is not shapes: the contrastive evaluator, local CLIP, Inception FID from a
file, and the one-line refusal (before any work, no network) when none is given."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from PIL import Image

from nas.cli import main
from nas.core.install import installed_torch
from tests.fixtures.data import strip_shapes_labels


@pytest.fixture(scope="module")
def plain_run(sample_world, tmp_path_factory):
    """The sample world's stock run on a copy of its cache whose records carry no shapes labels."""
    root = tmp_path_factory.mktemp("plain")
    cache = root / "cache"
    shutil.copytree(sample_world.cache, cache)
    strip_shapes_labels(cache)
    run = root / "run"
    shutil.copytree(sample_world.run_stock / "final", run / "final")
    config = (sample_world.run_stock / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(sample_world.cache), str(cache)))
    return run


@pytest.fixture(scope="module")
def plain_evaluator(plain_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_eval") / "evaluator"
    cache = plain_run.parent / "cache"
    assert main(["data", "train-evaluator", "--cache", str(cache), "--out", str(out), "--steps", "20",
                 "--val-items", "8"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with a character tokenizer and a 32 px image processor, on disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from tests.fixtures.data import TINY_CLIP, make_tiny_clip

    folder = make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")  # tokenizer; model replaced below
    vocab = len(CLIPTokenizer.from_pretrained(folder))
    tower = {k: v for k, v in TINY_CLIP.items() if k != "max_position_embeddings"}
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_CLIP),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _no_loading(monkeypatch):
    import nas.sample.components as components

    def refuse(*args, **kwargs):
        raise AssertionError("the run was loaded before the inputs were checked")

    monkeypatch.setattr(components, "load_run", refuse)


def test_no_evaluator_on_other_data_fails_in_one_line_offline(plain_run, tmp_path, capsys, monkeypatch):
    _no_network(monkeypatch)
    _no_loading(monkeypatch)
    assert main(["eval", str(plain_run), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nas eval: error: "), err
    assert f"nas data train-evaluator --cache {plain_run.parent / 'cache'}" in err[0]
    assert not (tmp_path / "o").exists()


def test_eval_with_the_contrastive_evaluator(plain_run, plain_evaluator, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(plain_run),
        "--evaluator",
        str(plain_evaluator),
        "--steps",
        "1,2",
        "--n",
        "6",
        "--k",
        "3",
    ]
    assert main([*argv, "--out", str(out), "--quiet", "--batch-size", "6"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["kind"] == "contrastive" and report["images"] == 6
    assert "held out of training" in report["prompts"]
    ref = report["reference"]
    assert ref["retrieval"]["k"] == 3 and ref["retrieval"]["chance"] == pytest.approx(1 / 3)
    assert 0 <= ref["real_alignment"] <= 1 and 0 <= ref["vae_alignment"] <= 1
    assert ref["fd_vae"] >= 0 and ref["fd_real_floor"] >= 0  # floor: training items before the held-out ones
    for row in report["results"]:
        assert 0 <= row["alignment"] <= 1 and row["chance_alignment"] == pytest.approx(1 / 3)
        assert row["alignment_k"] == 3 and row["frechet_distance"] >= 0
    assert report["results"][-1]["rmse_to_max"] == 0
    assert Image.open(out / "quality_vs_steps.png").size[0] >= 1000  # alignment and Frechet panels
    printed = capsys.readouterr().out
    assert "(chance 0.333)" in printed and "own prompt first among K=3" in printed


def test_evaluator_of_another_text_encoder_is_refused(
    plain_run, plain_evaluator, tmp_path, capsys, monkeypatch
):
    other = tmp_path / "other"
    shutil.copytree(plain_evaluator, other)
    doc = json.loads((other / "evaluator.json").read_text())
    doc["text"]["identity"]["sha256"] = "f" * 64
    (other / "evaluator.json").write_text(json.dumps(doc))
    _no_loading(monkeypatch)
    assert main(["eval", str(plain_run), "--evaluator", str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the evaluator's" in err[0] and "ffffffffffff" in err[0], err


def test_local_clip_scores_offline(plain_run, plain_evaluator, clip_dir, tmp_path, monkeypatch):
    _no_network(monkeypatch)
    base = ["eval", str(plain_run), "--steps", "1", "--n", "4", "--quiet", "--clip", str(clip_dir)]
    assert main([*base, "--out", str(tmp_path / "clip")]) == 0
    report = json.loads((tmp_path / "clip" / "eval.json").read_text())
    row = report["results"][0]
    assert report["kind"] == "clip" and report["reference"]["retrieval"]["k"] == 4  # 4 distinct prompts
    assert 0 <= row["alignment"] <= 1 and 0 <= row["clip_score"] <= 100 and row["frechet_distance"] >= 0
    assert main([*base, "--evaluator", str(plain_evaluator), "--out", str(tmp_path / "both")]) == 0
    report = json.loads((tmp_path / "both" / "eval.json").read_text())
    row = report["results"][0]
    assert report["kind"] == "contrastive"  # the evaluator is primary; CLIP's figures sit beside
    assert {"alignment", "frechet_distance", "clip_alignment", "clip_score", "clip_frechet_distance"} <= set(
        row
    )
    assert "clip_retrieval" in report["reference"]


def test_bad_clip_and_fid_inputs_are_one_line(plain_run, tmp_path, capsys, monkeypatch):
    _no_network(monkeypatch)
    _no_loading(monkeypatch)
    (tmp_path / "weights.pth").write_bytes(b"not inception")
    cases = [(["--clip", str(tmp_path)], "no config.json"),
             (["--fid-weights", str(tmp_path / "missing.pth")], "no such file")]  # fmt: skip
    try:
        import torch_fidelity  # noqa: F401
        import torchmetrics  # noqa: F401
    except ImportError:  # the hint installs them next to the installed torch, never another one
        cases.append((["--fid-weights", str(tmp_path / "weights.pth")], f"torch=={installed_torch()}"))
    for extra, message in cases:
        assert main(["eval", str(plain_run), "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
