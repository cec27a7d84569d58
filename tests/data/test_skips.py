"""Skipped samples are named: file, metadata.jsonl line (or shard and member), reason, detail; the
latent cache's skipped.jsonl survives resume; a malformed metadata line is reported whole."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from nas.cli import main
from nas.core.errors import NasError
from nas.data.cache import open_cache, precompute
from nas.data.encoders import load_vae, vae_identity
from nas.data.folders import load_images, open_source
from nas.data.skips import Skip, Skips


def _png(kind: str, seed: int = 0) -> bytes:
    """A 32 px PNG like the user's: stripes, a gradient, or noise (a large file to cut short)."""
    _, x = np.mgrid[0:32, 0:32]
    if kind == "stripes":
        gray = (x // 4 % 2) * 255
    elif kind == "gradient":
        gray = x * 8
    else:
        gray = np.random.default_rng(seed).integers(0, 256, (32, 32))
    buf = io.BytesIO()
    Image.fromarray(np.stack([gray] * 3, -1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# One line of each bad kind between good ones; line numbers are metadata.jsonl's (1-based).
ROWS = [
    {"file_name": "img/000.png", "text": "black and white stripes"},  # 1 ok
    {"file_name": "img/003.png", "text": "gone"},  # 2 missing file
    {"file_name": "img/s3.png", "text": 12345},  # 3 caption not a string
    {"file_name": "img/s4.png", "text": ["a", "list"]},  # 4
    {"file_name": "img/s5.png", "text": None},  # 5
    {"file_name": "img/s6.png", "text": {"en": "a dict"}},  # 6
    {"file_name": "img/s7.png", "text": "   "},  # 7 empty caption
    {"file_name": "img/s8.png", "caption": "wrong key"},  # 8 no caption
    {"text": "no file"},  # 9 no file_name
    {"file_name": "./img/000.png", "text": "listed again"},  # 10 duplicate of line 1
    {"file_name": "img/bad.png", "text": "not a png"},  # 11 corrupt
    {"file_name": "img/cut.png", "text": "cut short"},  # 12 corrupt (truncated)
    {"file_name": "img/dir.png", "text": "a folder"},  # 13 unreadable file
    {"file_name": "img/001.png", "text": "a gradient"},  # 14 ok
    {"file_name": "img/002.png", "text": "noise"},  # 15 ok
    {"file_name": "img/copy.png", "text": "the stripes again"},  # 16 ok: same bytes as 000, kept
]
LISTING = [  # (reason, file, line, detail) skipped while listing
    ("caption not a string", "img/s3.png", 3, "number"),
    ("caption not a string", "img/s4.png", 4, "array"),
    ("caption not a string", "img/s5.png", 5, "null"),
    ("caption not a string", "img/s6.png", 6, "object"),
    ("empty caption", "img/s7.png", 7, ""),
    ("no caption", "img/s8.png", 8, "no 'text' key"),
    ("no file_name", None, 9, "file_name is absent"),
    ("duplicate", "./img/000.png", 10, "also on line 1"),
]


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "mine"
    (root / "img" / "dir.png").mkdir(parents=True)
    for name, kind in [("000", "stripes"), ("001", "gradient"), ("002", "noise"), ("copy", "stripes")]:
        (root / "img" / f"{name}.png").write_bytes(_png(kind))
    for i in range(3, 9):
        (root / "img" / f"s{i}.png").write_bytes(_png("gradient"))
    (root / "img" / "bad.png").write_bytes(b"this is not a png")
    noise = _png("noise", seed=1)
    (root / "img" / "cut.png").write_bytes(noise[: len(noise) * 3 // 5])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(skips):
    return [(s.reason, s.file, s.line, s.detail) for s in skips]


def test_each_bad_item_is_named_with_file_line_and_reason(bad_folder):
    source = open_source(bad_folder)
    assert _rows(source.skips) == LISTING
    assert [e.line for e in source.entries] == [1, 2, 11, 12, 13, 14, 15, 16]
    _, kept, skips = load_images(source, 32)
    assert kept == [0, 5, 6, 7]  # lines 1, 14, 15, 16: identical bytes under another name are kept
    rows = _rows(skips)
    assert rows[0] == ("missing file", "img/003.png", 2, "")
    assert rows[1:9] == LISTING
    assert rows[9] == ("corrupt image", "img/bad.png", 11, "cannot identify image file")
    assert rows[10][:3] == ("corrupt image", "img/cut.png", 12) and rows[10][3]
    assert rows[11] == ("unreadable file", "img/dir.png", 13, "Is a directory")
    cut = rows[10][3][:77] + "..." if len(rows[10][3]) > 80 else rows[10][3]
    assert skips.summary() == (
        "skipped 12: 1 missing file (img/003.png line 2); "
        "4 caption not a string (img/s3.png line 3: number, img/s4.png line 4: array, "
        "img/s5.png line 5: null, and 1 more); 1 empty caption (img/s7.png line 7); "
        "1 no caption (img/s8.png line 8: no 'text' key); 1 no file_name (line 9: file_name is absent); "
        "1 duplicate (./img/000.png line 10: also on line 1); "
        f"2 corrupt image (img/bad.png line 11: cannot identify image file, img/cut.png line 12: {cut}); "
        "1 unreadable file (img/dir.png line 13: Is a directory)"
    )
    assert skips.counts() == {
        "caption not a string": 4, "corrupt image": 2, "duplicate": 1, "empty caption": 1,
        "missing file": 1, "no caption": 1, "no file_name": 1, "unreadable file": 1,
    }  # fmt: skip


def test_tar_skips_name_the_shard_and_member(tmp_path):
    members = [
        ("000.png", _png("stripes")), ("000.txt", b"stripes"),
        ("001.txt", b"a caption without its image"),
        ("002.png", _png("gradient")),
        ("003.png", _png("gradient")), ("003.json", json.dumps({"text": 7}).encode()),
        ("004.png", _png("gradient")), ("004.txt", b"  "),
        ("005.png", _png("gradient")), ("005.jpg", _png("stripes")), ("005.txt", b"two images"),
        ("006.png", b"garbage"), ("006.txt", b"corrupt"),
    ]  # fmt: skip
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = open_source(tmp_path / "00000.tar")
    assert [e.key for e in source.entries] == ["00000.tar/000", "00000.tar/005", "00000.tar/006"]
    _, kept, skips = load_images(source, 32)
    assert kept == [0, 1]
    assert [(s.reason, s.file, s.member, s.line, s.detail) for s in skips] == [
        ("no image", "00000.tar", "001.txt", None, ""),
        ("no caption", "00000.tar", "002.png", None, "no 002.txt and no 'text' in 002.json"),
        ("caption not a string", "00000.tar", "003.png", None, "number"),
        ("empty caption", "00000.tar", "004.png", None, ""),
        ("duplicate", "00000.tar", "005.jpg", None, "a second image for 005; 005.png is kept"),
        ("corrupt image", "00000.tar", "006.png", None, "cannot identify image file"),
    ]
    assert "1 no image (00000.tar:001.txt)" in skips.summary()


def test_cache_writes_skipped_jsonl_and_resume_does_not_repeat_rows(
    bad_folder, tiny_vae_dir, minilm, tmp_path, capsys
):
    out = tmp_path / "cache"
    argv = ["precompute", "--data", str(bad_folder), "--vae", str(tiny_vae_dir), "--out", str(out),
            "--resolution", "32", "--shard-size", "3", "--batch", "4", "--device", "cpu"]  # fmt: skip
    source = open_source(bad_folder)
    real_load, calls = source.load, []

    def dying_load(entry, resolution):
        calls.append(1)
        if len(calls) == 5:  # in the second shard (lines 12, 13, 14): the first shard is written
            raise KeyboardInterrupt
        return real_load(entry, resolution)

    source.load = dying_load
    with pytest.raises(KeyboardInterrupt):
        precompute(source, load_vae(tiny_vae_dir), vae_identity(tiny_vae_dir), minilm, out,
                   resolution=32, batch_size=4, shard_size=3)  # fmt: skip
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["000000.safetensors"]
    assert not (out / "manifest.json").exists()
    for _ in range(2):  # resume, then rerun the complete cache: each bad item is listed once
        capsys.readouterr()
        assert main(argv) == 0
        rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
        assert [(r["reason"], r["file"], r["line"]) for r in rows] == [
            ("missing file", "img/003.png", 2),
            *[(reason, file, line) for reason, file, line, _ in LISTING],
            ("corrupt image", "img/bad.png", 11),
            ("corrupt image", "img/cut.png", 12),
            ("unreadable file", "img/dir.png", 13),
        ]
        assert all(set(r) == {"file", "line", "member", "reason", "detail"} for r in rows)
        manifest = open_cache(out).manifest
        assert manifest["count"] == 4 and manifest["skipped"] == len(rows) == 12
        assert manifest["skipped_reasons"] == dict(sorted(Counter(r["reason"] for r in rows).items()))
        assert open_cache(out).skips() == Skips.from_rows(rows)
        printed = capsys.readouterr().out.strip().splitlines()
        assert printed[-1].startswith("skipped 12: 1 missing file (img/003.png line 2); 4 caption not")
        assert printed[-1].endswith(
            f"1 unreadable file (img/dir.png line 13: Is a directory); all in {out}/skipped.jsonl"
        )
    # The same bytes as an uninterrupted run.
    whole = tmp_path / "whole"
    precompute(open_source(bad_folder), load_vae(tiny_vae_dir), vae_identity(tiny_vae_dir), minilm, whole,
               resolution=32, batch_size=4, shard_size=3)  # fmt: skip
    assert _files(whole) == _files(out)


def test_malformed_json_line_is_reported_whole(tiny_vae_dir, tmp_path, capsys):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "a.png").write_bytes(_png("stripes"))
    good = json.dumps({"file_name": "a.png", "text": "stripes"})
    (root / "metadata.jsonl").write_text(good + '\n{"file_name": "a.png", "text": "a\tb"}\n')
    meta = root / "metadata.jsonl"
    want = (
        f"{meta}: line 2: not valid JSON (json.loads of this line: Invalid control character at: "
        "line 1 column 34 (char 33)); a tab or line break inside a string must be written as \\t or \\n"
    )
    with pytest.raises(NasError) as caught:
        open_source(root)
    assert str(caught.value) == want
    argv = ["precompute", "--data", str(root), "--vae", str(tiny_vae_dir), "--out", str(tmp_path / "c")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"nas precompute: error: {want}"
    assert not (tmp_path / "c").exists()


def test_metadata_encoding_and_shape_errors_name_the_line(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "a.png").write_bytes(_png("stripes"))
    meta = root / "metadata.jsonl"
    meta.write_bytes(b'\xef\xbb\xbf{"file_name": "a.png", "text": "a BOM is fine"}\n')
    assert open_source(root).entries[0].text == "a BOM is fine"
    meta.write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(
        NasError, match=r"metadata\.jsonl: line 2: not UTF-8 \(invalid continuation byte at byte 35"
    ):
        open_source(root)
    meta.write_text('{"file_name": "a.png", "text": "ok"}\n["a.png", "list"]\n')
    with pytest.raises(NasError, match=r"line 2: expected a JSON object with file_name and text, got array$"):
        open_source(root)
    meta.write_text('{"file_name": "a.png", "text": "  "}\n')
    with pytest.raises(NasError, match=r"no usable sample \(skipped 1: 1 empty caption \(a\.png line 1\)\)$"):
        open_source(root)


def test_skip_rows_round_trip_and_reasons_are_checked():
    skip = Skip("missing file", "img/3.png", 4)
    assert skip.name() == "img/3.png line 4"
    assert Skips.from_rows([skip.row()]) == [skip]
    with pytest.raises(ValueError, match="unknown skip reason 'unreadable image'"):
        Skip("unreadable image")
    long = Skip("corrupt image", "x.png", 1, detail="y" * 200)
    assert long.name(80) == "x.png line 1: " + "y" * 77 + "..."
