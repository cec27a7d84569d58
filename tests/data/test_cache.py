"""Latent cache: contents match the encoders, fresh draws per read, resume to identical bytes, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nas.cli import main
from nas.core.errors import NasError
from nas.data.cache import open_cache, precompute
from nas.data.encoders import load_vae, vae_identity
from nas.data.folders import open_source, to_tensor
from tests.fixtures.data import make_tiny_vae


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run(source, vae_dir, text_encoder, out, **kw):
    kw = {"resolution": 32, "batch_size": 32, "shard_size": 16, **kw}
    return precompute(source, load_vae(vae_dir), vae_identity(vae_dir), text_encoder, out, **kw)


def test_manifest_and_records(shapes_cache, shapes_dir, tiny_vae_dir):
    cache = open_cache(shapes_cache)
    m = cache.manifest
    rows = (shapes_dir / "train" / "metadata.jsonl").read_text().splitlines()
    assert len(cache) == m["count"] == len(rows) and m["skipped"] == 0
    assert (m["latent_channels"], m["latent_size"], m["text_len"], m["text_dim"]) == (4, 8, 32, 384)
    assert m["resolution"] == 32 and m["text_encoder"]["path"] == "minilm"
    assert m["vae"]["sha256"] == vae_identity(tiny_vae_dir)["sha256"]
    assert m["scaling_factor"] == pytest.approx(load_vae(tiny_vae_dir).config.scaling_factor)
    assert len(m["shards"]) == -(-len(rows) // 16)
    records = cache.records()
    assert [r["file_name"] for r in records] == [json.loads(r)["file_name"] for r in rows]
    assert cache.captions() == [r["text"] for r in records] and "objects" in records[0]


def test_cached_moments_and_text_match_the_encoders(shapes_cache, shapes_dir, tiny_vae_dir, minilm):
    cache = open_cache(shapes_cache)
    vae = load_vae(tiny_vae_dir)
    source = open_source(shapes_dir / "train")
    for index in (0, 17, len(cache) - 1):
        posterior = vae.encode(to_tensor(source.load(source.entries[index], 32))[None]).latent_dist
        mean, logvar, text, mask = cache.moments(index)
        assert torch.allclose(mean, posterior.mean[0], atol=1e-5)
        assert torch.allclose(logvar, posterior.logvar[0], atol=1e-5)
        hidden, want_mask = minilm.encode([cache.captions()[index]])
        assert text.dtype == torch.float16 and torch.allclose(text.float(), hidden[0], atol=2e-2, rtol=1e-2)
        assert torch.equal(mask.long(), want_mask[0])
    empty, empty_mask = cache.empty_text()
    hidden, want_mask = minilm.encode([""])
    assert torch.allclose(empty, hidden[0], atol=1e-6) and torch.equal(empty_mask, want_mask[0])


def test_each_read_draws_a_fresh_latent(shapes_cache):
    cache = open_cache(shapes_cache)
    scale = cache.manifest["scaling_factor"]
    ds = cache.dataset()
    a, b = ds[3], ds[3]
    assert a["latents"].shape == (4, 8, 8) and a["text"].shape == (32, 384) and a["index"] == 3
    assert a["text"].dtype == torch.float32 and a["text_mask"].dtype == torch.long
    assert not torch.equal(a["latents"], b["latents"])
    mean, logvar, _, _ = cache.moments(3)
    assert torch.equal(cache.dataset(sample=False)[3]["latents"], mean * scale)
    # The draws follow N(mean, exp(logvar)) * scale.
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([cache.dataset(generator=g)[3]["latents"] for _ in range(400)])
    assert torch.allclose(draws.mean(0), mean * scale, atol=5 * (0.5 * logvar).exp().max() * scale / 20)
    assert torch.allclose(draws.std(0), (0.5 * logvar).exp() * scale, rtol=0.2)
    # Seeded generators reproduce draws.
    one = cache.dataset(generator=torch.Generator().manual_seed(5))[7]["latents"]
    two = cache.dataset(generator=torch.Generator().manual_seed(5))[7]["latents"]
    assert torch.equal(one, two)


def test_memory_mapped_reads_equal_in_memory_reads(shapes_cache, monkeypatch):
    import nas.data.cache as cache_module

    in_memory = open_cache(shapes_cache)
    monkeypatch.setattr(cache_module, "IN_MEMORY_BYTES", 0)
    mapped = open_cache(shapes_cache)
    assert in_memory.in_memory and not mapped.in_memory
    for i in (0, 16, 40):
        for x, y in zip(in_memory.moments(i), mapped.moments(i)):
            assert torch.equal(x, y)
    loader = torch.utils.data.DataLoader(mapped.dataset(), batch_size=8, num_workers=1)
    batch = next(iter(loader))
    assert batch["latents"].shape == (8, 4, 8, 8) and batch["text_mask"].shape == (8, 32)


def test_interrupted_run_resumes_to_the_same_bytes(shapes_cache, shapes_dir, tiny_vae_dir, minilm, tmp_path):
    source = open_source(shapes_dir / "train")
    real_load, calls = source.load, []

    def dying_load(entry, resolution):
        calls.append(1)
        if len(calls) == 40:  # in the third shard of 16
            raise KeyboardInterrupt
        return real_load(entry, resolution)

    source.load = dying_load
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _run(source, tiny_vae_dir, minilm, out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    (out / "shards" / "000002.safetensors.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves
    with pytest.raises(NasError, match="incomplete"):
        open_cache(out)
    manifest = _run(open_source(shapes_dir / "train"), tiny_vae_dir, minilm, out)
    assert manifest == open_cache(shapes_cache).manifest
    assert _files(out) == _files(shapes_cache)
    # A third run finds it complete and changes nothing.
    _run(open_source(shapes_dir / "train"), tiny_vae_dir, minilm, out)
    assert _files(out) == _files(shapes_cache)


def test_other_encoders_or_resolution_are_refused(shapes_cache, shapes_dir, minilm, tmp_path):
    before = _files(shapes_cache)
    other_vae = make_tiny_vae(tmp_path / "other_vae", seed=1)
    with pytest.raises(NasError, match=r"refusing to mix caches: vae: cache has .*sha256="):
        _run(open_source(shapes_dir / "train"), other_vae, minilm, shapes_cache)
    vae_dir = open_cache(shapes_cache).manifest["vae"]["path"]
    with pytest.raises(NasError, match="resolution: cache has 32, command asks for 16"):
        _run(open_source(shapes_dir / "train"), vae_dir, minilm, shapes_cache, resolution=16)
    with pytest.raises(NasError, match="source: cache has"):
        _run(open_source(shapes_dir / "validation"), vae_dir, minilm, shapes_cache)
    assert _files(shapes_cache) == before


def test_skipped_images_are_counted(shapes_dir, tiny_vae_dir, minilm, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes_dir / "train", data)
    names = sorted(p.name for p in data.glob("*.png"))
    (data / names[0]).write_bytes(b"corrupt")
    (data / names[1]).unlink()
    manifest = _run(open_source(data), tiny_vae_dir, minilm, tmp_path / "cache")
    assert manifest["skipped"] == 2 and manifest["skipped_reasons"] == {"corrupt image": 1, "missing file": 1}
    named = [(s.reason, s.file, s.line) for s in open_cache(tmp_path / "cache").skips()]
    assert named == [("corrupt image", names[0], 1), ("missing file", names[1], 2)]
    assert manifest["count"] == len(names) - 2
    assert open_cache(tmp_path / "cache").records()[0]["file_name"] == names[2]


def test_open_cache_errors(tmp_path):
    with pytest.raises(NasError, match="latent cache not found"):
        open_cache(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(NasError, match="not a nas latent cache"):
        open_cache(tmp_path / "other")


def test_cli_bad_input_exits_2_with_one_line(shapes_dir, shapes_cache, tmp_path, capsys):
    (tmp_path / "not_vae").mkdir()
    (tmp_path / "not_vae" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = [
        (["--data", str(tmp_path / "missing")], "no such file or folder"),
        (["--data", str(shapes_dir / "train"), "--vae", str(tmp_path / "not_vae")], "AutoencoderKL"),
        (["--data", str(shapes_dir / "train"), "--out", str(busy)], "not a nas latent cache"),
    ]
    vae = open_cache(shapes_cache).manifest["vae"]["path"]
    for extra, message in cases:
        args = {"--data": None, "--vae": vae, "--out": str(tmp_path / "new"), "--batch": "32"}
        args.update(dict(zip(extra[::2], extra[1::2])))
        argv = ["precompute"] + [x for k, v in args.items() for x in (k, v)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (busy / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_cache(tmp_path):
    """The real thing: SIGKILL `nas precompute` mid-run, rerun it, compare with an uninterrupted run."""
    from nas.data import shapes

    shapes.write(tmp_path / "shapes", n=600)
    vae = make_tiny_vae(tmp_path / "vae")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def command(out):
        return [sys.executable, "-m", "nas", "precompute", "--data", str(tmp_path / "shapes" / "train"),
                "--vae", str(vae), "--out", str(out), "--shard-size", "64", "--batch", "32"]  # fmt: skip

    subprocess.run(command(tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(command(tmp_path / "killed"), env=env, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*.safetensors"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    subprocess.run(command(tmp_path / "killed"), check=True, env=env, capture_output=True)
    assert _files(tmp_path / "killed") == _files(tmp_path / "full")
