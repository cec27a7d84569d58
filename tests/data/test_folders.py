"""Readers: image folder + metadata.jsonl and WebDataset tar shards; resize/crop; skip-and-count."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from nas.core.errors import NasError
from nas.data.folders import (
    UnreadableImage,
    expand_shards,
    load_images,
    open_source,
    resize_center_crop,
    to_tensor,
)


def _png(color=(255, 0, 0), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, rows, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_resize_center_crop_keeps_the_middle():
    # 60x30: left third red, middle green, right third blue -> the 32x32 crop is mostly green.
    array = np.zeros((30, 60, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:40] = (0, 255, 0)
    array[:, 40:] = (0, 0, 255)
    out = resize_center_crop(Image.fromarray(array), 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    assert pixels[16, 16, 1] > 240 and pixels[16, 16, 0] < 20
    assert pixels[16, 2, 0] > 200 and pixels[16, 29, 2] > 200  # edges keep a sliver of red/blue
    tensor = to_tensor(out)
    assert tensor.shape == (3, 32, 32) and tensor.min() >= -1 and tensor.max() <= 1


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(resize_center_crop(rgba, 8)).min() == 255


def test_imagefolder_skips_and_counts(tmp_path):
    rows = [
        {"file_name": "a.png", "text": "a red thing", "label": 1},
        {"file_name": "b.png", "text": "   "},  # empty caption
        {"file_name": "c.png"},  # no caption
        {"file_name": "d.png", "text": "corrupt"},
        {"file_name": "missing.png", "text": "gone"},
        {"text": "no file"},
        {"file_name": "e.png", "text": "a green thing"},
    ]
    files = {
        "a.png": _png(),
        "b.png": _png(),
        "c.png": _png(),
        "d.png": b"not a png",
        "e.png": _png((0, 255, 0)),
    }
    source = open_source(_folder(tmp_path / "f", rows, files))
    assert source.kind == "imagefolder"
    assert [e.key for e in source.entries] == ["a.png", "d.png", "missing.png", "e.png"]
    assert source.skips.counts() == {"empty caption": 1, "no caption": 1, "no file_name": 1}
    assert source.entries[0].record["label"] == 1
    with pytest.raises(UnreadableImage):
        source.load(source.entries[1], 16)
    images, kept, skipped = load_images(source, 16)
    assert images.shape == (2, 3, 16, 16) and kept == [0, 3]
    assert skipped.counts() == {
        "corrupt image": 1, "empty caption": 1, "missing file": 1, "no caption": 1, "no file_name": 1
    }  # fmt: skip
    assert [(s.reason, s.line) for s in skipped] == [
        ("empty caption", 2), ("no caption", 3), ("corrupt image", 4), ("missing file", 5), ("no file_name", 6)
    ]  # fmt: skip
    assert source.fingerprint()["entries"] == 4


def test_imagefolder_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(NasError, match="no such file or folder"):
        open_source(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NasError, match=r"no metadata\.jsonl and no \.tar shards"):
        open_source(empty)
    with pytest.raises(NasError, match=r"'text' key \(line 1 has: caption, file_name\)"):
        open_source(_folder(tmp_path / "k", [{"file_name": "a.png", "caption": "x"}], {"a.png": _png()}))
    with pytest.raises(NasError, match="line 2: not valid JSON"):
        bad = _folder(tmp_path / "j", [{"file_name": "a.png", "text": "x"}], {"a.png": _png()})
        (bad / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
        open_source(bad)
    with pytest.raises(NasError, match="no usable sample"):
        open_source(_folder(tmp_path / "u", [{"file_name": "a.png", "text": ""}], {"a.png": _png()}))
    # A caption under another key works when named.
    source = open_source(tmp_path / "k", caption_key="caption")
    assert source.entries[0].text == "x"


def test_split_root_points_to_split_folders(shapes_dir):
    with pytest.raises(NasError, match=r"split folders train, validation have one: pass .*validation"):
        open_source(shapes_dir)
    assert open_source(shapes_dir / "train").kind == "imagefolder"


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "00000.tar", [
        ("000000000.jpg", _png()), ("000000000.txt", b"a red square"),
        ("000000000.json", json.dumps({"url": "http://x", "similarity": 0.3}).encode()),
        ("000000001.png", _png((0, 0, 255))), ("000000001.txt", b"a blue square"),
        ("000000002.png", _png()),  # no caption
    ])  # fmt: skip
    _tar(shards / "00001.tar", [
        ("sub/000000003.jpg", b"garbage"), ("sub/000000003.txt", b"broken"),
        ("000000004.txt", b"caption without image"),
        ("000000005.webp", _png((0, 255, 0))), ("000000005.txt", b"green"),
    ])  # fmt: skip
    source = open_source(shards)
    assert source.kind == "webdataset"
    keys = [e.key for e in source.entries]
    assert keys == [
        "00000.tar/000000000",
        "00000.tar/000000001",
        "00001.tar/sub/000000003",
        "00001.tar/000000005",
    ]
    assert source.skips.counts() == {"no caption": 1, "no image": 1}
    assert source.entries[0].record["url"] == "http://x" and source.entries[0].text == "a red square"
    images, kept, skipped = load_images(source, 8)
    assert kept == [0, 1, 3] and skipped.counts()["corrupt image"] == 1
    assert images[1, 2].mean() > 0.9  # blue channel of the blue square
    # The same shards by brace pattern, glob, and single file.
    assert expand_shards(str(shards / "{00000..00001}.tar")) == [shards / "00000.tar", shards / "00001.tar"]
    assert len(open_source(str(shards / "*.tar"))) == 4
    assert len(open_source(shards / "00001.tar")) == 2
    with pytest.raises(NasError, match="no tar shard matches"):
        open_source(str(shards / "{00005..00006}.tar"))


def test_truncated_and_unreadable_shards(tmp_path):
    # A download cut in the middle of sample 002: samples 000-001 stay usable, 002 lost its caption.
    members = [(f"{i:03d}{ext}", data) for i in range(4) for ext, data in ((".png", _png()), (".txt", b"x"))]
    data = _tar(tmp_path / "a.tar", members).read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "a.tar").write_bytes(data[: len(data) // 2])
    source = open_source(tmp_path / "cut" / "a.tar")
    assert [e.key for e in source.entries] == ["a.tar/000", "a.tar/001"]
    assert source.skips.counts() == {"no caption": 1}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.tar").write_bytes(b"\x00not a tar" * 10)
    with pytest.raises(NasError, match=r"b\.tar"):
        open_source(tmp_path / "bad")
