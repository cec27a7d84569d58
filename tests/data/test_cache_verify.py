"""Verified caches: cheap checks at open, `nas precompute --verify` (checksums) and `--repair`.

Each test damages a copy of the session's `shapes_cache` (4 shards of 16 items, tiny VAE + MiniLM)
the way a disk or a careless copy would: a damaged header, flipped data bytes that keep every value
finite, a truncated file, a manifest from before checksums were recorded.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import SafetensorError, safe_open

from nas.cli import main
from nas.data.cache import open_cache
from nas.data.verify import CacheDamaged, header_problem

SHARD = "shards/000001.safetensors"


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(shapes_cache, tmp_path):
    """A private copy of the shared cache, to damage."""
    return shutil.copytree(shapes_cache, tmp_path / "cache")


def _flip_finite(path, tensor="mean", item=3):
    """Flip the lowest mantissa bit of one float32 of `tensor`: the value changes, stays finite."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + length])[tensor]["data_offsets"]
    at = 8 + length + begin + item * 4
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with safe_open(str(path), framework="pt") as handle:  # the library reads it without complaint
        assert torch.isfinite(handle.get_tensor(tensor)).all()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_manifest_records_size_and_checksum_of_every_file(shapes_cache):
    m = open_cache(shapes_cache).manifest
    for shard in m["shards"]:
        path = shapes_cache / shard["file"]
        assert shard["bytes"] == path.stat().st_size and len(shard["sha256"]) == 64
    assert set(m["files"]) == {"empty_text.safetensors", "records.jsonl"}
    assert m["encode"] == {"batch_size": 32, "device": "cpu", "caption_key": "text"}


def test_header_corrupt_shard_is_refused_at_open_and_by_train(cache, repo_root, tmp_path, capsys):
    path = cache / SHARD
    data = bytearray(path.read_bytes())
    data[20:24] = b"\xff\xfe\xff\xfe"  # inside the JSON header: invalid UTF-8, same size
    path.write_bytes(bytes(data))
    with pytest.raises(SafetensorError):  # what training met before: a raw library error
        safe_open(str(path), framework="pt")
    with pytest.raises(CacheDamaged) as caught:
        open_cache(cache)
    message = str(caught.value)
    assert str(path) in message and "damaged header" in message
    assert f"nas precompute --repair {cache}" in message and "\n" not in message
    arch = repo_root / "search_spaces" / "archs" / "tiny_stock.yaml"
    argv = ["train", "tiny", "--arch", str(arch), "--cache", str(cache), "--out", str(tmp_path / "run")]
    assert main([*argv, "--max-steps", "2"]) == 2
    line = _one_line(capsys)
    assert line.startswith("nas train: error: ") and str(path) in line and "--repair" in line
    assert not (tmp_path / "run" / "metrics.csv").exists()  # training never started


def test_truncated_shard_is_refused_at_open(cache):
    path = cache / SHARD
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CacheDamaged, match=r"000001.safetensors: \d+ bytes, the manifest records \d+"):
        open_cache(cache)
    # Without the recorded size (an old manifest) the header's offsets still give it away.
    assert "truncated" in header_problem(path, None)


def test_data_corrupt_shard_verify_then_repair_to_the_same_bytes(shapes_cache, cache, capsys):
    original = _files(shapes_cache)
    _flip_finite(cache / SHARD)
    opened = open_cache(cache)  # sizes and headers are fine: the cheap check passes
    with pytest.raises(CacheDamaged, match=r"000001\.safetensors: checksum mismatch"):
        opened.moments(20)  # an in-memory cache hashes each shard as it loads it, before use
    assert main(["precompute", "--verify", str(cache)]) == 2
    out, err = capsys.readouterr()
    bad = [line for line in err.splitlines() if "000001" in line]
    assert len(bad) == 1 and "checksum mismatch" in bad[0] and f"nas precompute --repair {cache}" in bad[0]
    oks = [line for line in out.splitlines() if line.startswith("ok ")]
    shards = len(open_cache(shapes_cache).manifest["shards"])
    assert len(oks) == shards - 1 + 2 and "1 bad" in out  # the good shards, empty_text, records.jsonl
    assert main(["precompute", "--repair", str(cache)]) == 0
    assert f"repaired {cache / SHARD}: byte-identical to the original" in capsys.readouterr().out
    assert main(["precompute", "--verify", str(cache)]) == 0
    assert "all good" in capsys.readouterr().out
    assert _files(cache) == original  # shard, records and manifest: the bytes of the original


def test_damaged_shard_read_in_a_loader_worker_is_one_line(cache):
    _flip_finite(cache / "shards/000000.safetensors")
    loader = torch.utils.data.DataLoader(open_cache(cache).dataset(), batch_size=4, num_workers=1)
    with pytest.raises(CacheDamaged) as caught:
        next(iter(loader))
    assert str(caught.value) == (
        f"{cache / 'shards/000000.safetensors'}: checksum mismatch (bytes changed since written); "
        f"repair it with `nas precompute --repair {cache}`"
    )


def test_rerunning_precompute_recomputes_a_damaged_shard(shapes_cache, cache, capsys):
    """The plain rerun of the making command never blesses damaged bytes with a new checksum."""
    original = _files(shapes_cache)
    _flip_finite(cache / "shards/000002.safetensors", tensor="logvar")
    (cache / "shards/000000.safetensors").write_bytes(b"\x00" * 10)
    m = json.loads((cache / "manifest.json").read_text())
    argv = ["precompute", "--data", m["source"]["path"], "--vae", m["vae"]["path"], "--out", str(cache)]
    assert main([*argv, "--batch", "32", "--shard-size", "16", "--resolution", "32"]) == 0
    assert _files(cache) == original


def test_old_manifest_without_checksums_opens_and_repair_adds_them(shapes_cache, cache, capsys):
    manifest_file = cache / "manifest.json"
    m = json.loads(manifest_file.read_text())
    for key in ("files", "encode"):
        del m[key]
    m["shards"] = [{"file": s["file"], "count": s["count"]} for s in m["shards"]]
    manifest_file.write_text(json.dumps(m))
    assert len(open_cache(cache)) == m["count"]
    assert capsys.readouterr().err == ""  # opens silently: every command that reads it would repeat a note
    assert main(["precompute", "--verify", str(cache)]) == 0
    assert "(size and header: no checksum recorded)" in capsys.readouterr().out
    assert main(["precompute", "--repair", str(cache)]) == 0
    assert f"checksums recorded for all {len(m['shards'])} shards" in capsys.readouterr().out
    assert open_cache(cache).manifest["shards"] == open_cache(shapes_cache).manifest["shards"]


def test_repair_without_the_source_is_one_line(cache, tmp_path, capsys):
    _flip_finite(cache / SHARD)
    m = json.loads((cache / "manifest.json").read_text())
    m["source"]["path"] = str(tmp_path / "gone")
    (cache / "manifest.json").write_text(json.dumps(m))
    assert main(["precompute", "--repair", str(cache)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("nas precompute: error: ") and "cannot repair: the source data" in line
    assert str(tmp_path / "gone") in line and "--data" in line


def test_flags_verify_and_repair_alone(cache, capsys):
    assert main(["precompute", "--verify", str(cache), "--repair", str(cache)]) == 2
    assert "give one" in _one_line(capsys)
    assert main(["precompute", "--out", str(cache)]) == 2
    assert "--data, --vae: required" in _one_line(capsys)
