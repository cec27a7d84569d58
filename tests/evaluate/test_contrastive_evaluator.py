"""Contrastive evaluator: retrieval alignment, training on a cache of non-shapes images, save/load, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nas.core.errors import NasError
from nas.evaluate import contrastive_evaluator as ce

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
PATTERNS = ("vertical stripes", "horizontal stripes", "checkerboard", "ring")
TINY = dict(channels=(8, 16, 32), feature_dim=32, embed_dim=32, batch_size=32, val_items=16)


def pattern_image(pattern: str, colour: tuple, size: int, rng: np.random.Generator) -> Image.Image:
    """A coloured pattern on white, with a random phase, period and noise: no two images alike."""
    y, x = np.mgrid[0:size, 0:size]
    period, phase = int(rng.integers(4, 9)), int(rng.integers(0, 8))
    if pattern == "vertical stripes":
        on = (x + phase) % period < period // 2
    elif pattern == "horizontal stripes":
        on = (y + phase) % period < period // 2
    elif pattern == "checkerboard":
        on = ((x + phase) // period + (y + phase) // period) % 2 == 0
    else:
        r = np.hypot(x - size / 2 + rng.normal(), y - size / 2 + rng.normal())
        radius = size * rng.uniform(0.25, 0.38)
        on = np.abs(r - radius) < size / 12
    pixels = np.where(on[..., None], np.array(colour), 255.0) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_patterns(folder, n: int, size: int = 32, seed: int = 0) -> None:
    """n captioned images ('a red checkerboard', ...), 16 captions in turn, with metadata.jsonl."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    kinds = list(itertools.product(COLOURS, PATTERNS))
    with (folder / "metadata.jsonl").open("w") as meta:
        for i in range(n):
            colour, pattern = kinds[i % len(kinds)]
            pattern_image(pattern, COLOURS[colour], size, rng).save(folder / f"{i:04d}.png")
            meta.write(json.dumps({"file_name": f"{i:04d}.png", "text": f"a {colour} {pattern}"}) + "\n")


@pytest.fixture(scope="module")
def patterns_cache(tmp_path_factory, tiny_vae_dir, minilm):
    """96 pattern images (16 captions, 6 each) at 32 px, cached with the tiny VAE and MiniLM."""
    from nas.data.cache import precompute
    from nas.data.encoders import load_vae, vae_identity
    from nas.data.folders import open_source

    root = tmp_path_factory.mktemp("patterns")
    write_patterns(root / "images", 96)
    precompute(open_source(root / "images"), load_vae(tiny_vae_dir), vae_identity(tiny_vae_dir), minilm,
               root / "cache", resolution=32, batch_size=48)  # fmt: skip
    return root / "cache"


def brute_force(sims: np.ndarray, captions: list[str], k: int) -> float:
    """Mean over images and over every choice of K-1 distractors among the distinct other captions."""
    reps = {c: j for j, c in reversed(list(enumerate(captions)))}
    total = 0.0
    for i, c in enumerate(captions):
        others = [j for cap, j in reps.items() if cap != c]
        draws = list(itertools.combinations(others, k - 1))
        total += sum(all(sims[i, reps[c]] > sims[i, j] for j in d) for d in draws) / len(draws)
    return total / len(captions)


def test_retrieval_alignment_is_the_exact_expectation_over_distractors():
    rng = np.random.default_rng(0)
    captions = ["a", "b", "c", "a", "d", "e", "f"]  # "a" twice: never its own distractor
    img = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(7, 5))).float(), dim=-1)
    txt = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(7, 5))).float(), dim=-1)
    txt[3] = txt[0]  # same caption, same embedding
    sims = (img @ txt.T).numpy()
    for k in (2, 3, 4):
        got = ce.retrieval_alignment(img, txt, captions, k)
        assert got["alignment"] == pytest.approx(brute_force(sims, captions, k))
        assert got["chance_alignment"] == pytest.approx(1 / k) and got["alignment_k"] == k
    assert ce.retrieval_alignment(img, txt, captions, 50)["alignment_k"] == 6  # capped: 6 distinct captions
    perfect = ce.retrieval_alignment(txt, txt, captions, 4)
    assert perfect["alignment"] == 1.0 and perfect["top1_all"] == 1.0
    assert ce.retrieval_alignment(-txt, txt, captions, 4)["alignment"] == 0.0
    with pytest.raises(NasError, match="2 distinct prompts"):
        ce.retrieval_alignment(img[:2], txt[:2], ["a", "a"], 4)


def test_chance_is_one_over_k():
    """Averaged over every ranking of the prompts, an image that ignores its prompt scores 1/K."""
    captions = list("abcde")
    scores = []
    for order in itertools.permutations(range(5)):
        sims = torch.tensor([order] * 5, dtype=torch.float32)  # every image ranks the prompts alike
        scores.append(ce.retrieval_alignment(sims, torch.eye(5), captions, 3)["alignment"])
    assert np.mean(scores) == pytest.approx(1 / 3)


def test_training_learns_retrieval_and_round_trips(patterns_cache, tmp_path):
    from safetensors.torch import load_file

    from nas.data.cache import open_cache
    from nas.evaluate import evaluators, shapes_evaluator

    cache = open_cache(patterns_cache)
    config = ce.ContrastiveConfig(**TINY, steps=60)
    evaluator, m = ce.train_contrastive(cache, config, progress=False)
    assert m["val_items"] == 16 and m["train_items"] == 80 and m["val_alignment_k"] == ce.DEFAULT_K
    assert m["val_chance_alignment"] == pytest.approx(1 / 8)
    torch.manual_seed(0)
    untrained = ce.ContrastiveEvaluator(
        ce.ContrastiveModel(config, cache.manifest["text_dim"]), config, evaluator.text
    )
    before = ce.split_metrics(untrained, cache, list(range(64, 80)))
    assert before["alignment"] < 0.5  # an untrained encoder is near chance (0.125)
    assert m["train_alignment"] > 0.8 and m["val_alignment"] > 0.6, m
    out = tmp_path / "evaluator"
    ce.save_evaluator(evaluator, out, cache_path=patterns_cache)
    assert sorted(p.name for p in out.iterdir()) == ["evaluator.json", "evaluator.safetensors"]
    assert all(
        v.dtype == torch.float32 or v.dtype == torch.int64 for v in load_file(out / ce.WEIGHTS).values()
    )
    doc = json.loads((out / ce.CONFIG).read_text())
    assert doc["kind"] == "contrastive" and doc["resolution"] == 32
    assert doc["text"]["identity"] == cache.manifest["text_encoder"]
    assert doc["metrics"]["val_alignment"] == m["val_alignment"]
    loaded = evaluators.load_evaluator(out)
    assert isinstance(loaded, ce.ContrastiveEvaluator)
    images = torch.rand(5, 3, 32, 32)
    assert torch.equal(loaded.features(images), evaluator.features(images))
    assert loaded.image_embeddings(images).norm(dim=-1) == pytest.approx(torch.ones(5), abs=1e-5)
    assert loaded.features(torch.rand(2, 3, 64, 64)).shape == (2, 32)  # other sizes are resized
    with pytest.raises(NasError, match="not a shapes one"):
        shapes_evaluator.load_evaluator(out)
    # Prompts encoded afresh give the cached captions' embeddings (float16 rounding included).
    captions = [r["text"] for r in cache.records()[:4]]
    fresh = loaded.prompt_embeddings(_minilm(cache), captions)
    cached = loaded.pooled_embeddings(ce.cache_text(cache, [0, 1, 2, 3]))
    assert torch.allclose(fresh, cached, atol=1e-3)


def _minilm(cache):
    from nas.data.encoders import load_text_encoder

    return load_text_encoder("minilm", max_length=int(cache.manifest["text_len"]))


def test_evaluators_refuse_unknown_kinds(tmp_path):
    from nas.evaluate import evaluators

    with pytest.raises(NasError, match="not an evaluator folder"):
        evaluators.load_evaluator(tmp_path)
    (tmp_path / "evaluator.json").write_text(json.dumps({"kind": "oracle"}))
    (tmp_path / "evaluator.safetensors").write_bytes(b"")
    with pytest.raises(NasError, match=r"kind 'oracle' \(allowed: shapes, contrastive\)"):
        evaluators.load_evaluator(tmp_path)


def test_cli_trains_on_a_cache_and_refuses_bad_flags(patterns_cache, tmp_path, capsys):
    from nas.cli import main

    out = tmp_path / "e"
    argv = ["data", "train-evaluator", "--cache", str(patterns_cache), "--out", str(out)]
    assert main([*argv, "--steps", "3", "--val-items", "16"]) == 0
    printed = capsys.readouterr().out
    assert "held-out retrieval" in printed and "among K=8" in printed and "chance 0.125" in printed
    assert json.loads((out / "evaluator.json").read_text())["metrics"]["val_items"] == 16
    assert main([*argv[:-1], str(tmp_path / "d"), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["resolved_config"]["steps"] == 1000
    cases = [
        (["--data", str(tmp_path)], "--data: not with --cache"),
        (["--size", "64"], "--size: not with --cache"),
        (["--val-items", "96"], "96 items leave too few to train on with --val-items 96"),
    ]
    for extra, message in cases:
        assert main([*argv[:-1], str(tmp_path / "new"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (
        main(["data", "train-evaluator", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "latent cache not found" in capsys.readouterr().err


def test_moved_source_is_one_line(patterns_cache, tmp_path):
    """The images are read from the cache's source; a source that changed is refused by name."""
    import shutil

    from nas.data.cache import open_cache

    cache_copy = tmp_path / "cache"
    shutil.copytree(patterns_cache, cache_copy)
    manifest = json.loads((cache_copy / "manifest.json").read_text())
    manifest["source"]["listing_sha256"] = "0" * 64
    (cache_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NasError, match="listing changed since the cache"):
        ce.train_contrastive(open_cache(cache_copy), ce.ContrastiveConfig(**TINY, steps=1), progress=False)
