"""The embedded `shapes` dataset: determinism, disjoint splits, labels that match pixels and captions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from nas.cli import main
from nas.core.errors import NasError
from nas.data import shapes


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    shapes.write(tmp_path / "a", n=40, seed=3)
    shapes.write(tmp_path / "b", n=40, seed=3)
    shapes.write(tmp_path / "c", n=40, seed=4)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert len([k for k in a if k.endswith(".png")]) == 40
    assert a["train/metadata.jsonl"] != c["train/metadata.jsonl"]


def test_sample_does_not_depend_on_n():
    first = [r for _, r in shapes.generate(5, seed=7)]
    more = [r for _, r in shapes.generate(50, seed=7)][:5]
    assert first == more
    img_a, _ = shapes.sample(3, seed=7)
    img_b, _ = shapes.sample(3, seed=7)
    assert img_a.tobytes() == img_b.tobytes()


def test_splits_never_share_a_scene(shapes_dir):
    rows = {
        split: [json.loads(line) for line in (shapes_dir / split / "metadata.jsonl").read_text().splitlines()]
        for split in shapes.SPLITS
    }
    assert len(rows["train"]) + len(rows["validation"]) == 72
    assert rows["validation"], "72 images at val_fraction 0.1 should hold out some scenes"

    def key(r):
        return json.dumps([r["objects"], r["background"]], sort_keys=True)

    assert not {key(r) for r in rows["train"]} & {key(r) for r in rows["validation"]}
    for split, split_rows in rows.items():
        for r in split_rows:
            assert r["split"] == split
            assert (shapes_dir / split / r["file_name"]).is_file()
            assert 1 <= len(r["objects"]) <= 2
            assert len({o["position"] for o in r["objects"]}) == len(r["objects"])


def test_caption_names_every_label():
    for index in range(200):
        _, r = shapes.sample(index, seed=0)
        for obj in r["objects"]:
            phrase = dict(shapes.POSITIONS)[obj["position"]]
            assert f"{obj['size']} {obj['colour']} {obj['shape']}" in r["text"]
            assert phrase in r["text"]
        assert r["background"] in r["text"]
    texts = {shapes.sample(i, seed=0)[1]["text"].split(" ")[0] for i in range(200)}
    assert len(texts) >= 3, "captions should use several templates"


PREPOSITIONS = {"in", "on", "at", "of", "with", "against"}
ARTICLES = {"a", "an", "the"}


def grammar_defects(text: str) -> list[str]:
    """Slot-filling defects: a preposition or article followed by a preposition ("a picture of in
    the top left"), an article followed by an article, a bare noun phrase after "of"/"with", "a"
    before a vowel, doubled spaces or commas, an empty slot, a dangling word at the end."""
    found = []
    if text != text.strip() or "  " in text or ", ," in text or ",," in text or " ," in text:
        found.append("spacing or empty slot")
    if "{" in text or "}" in text or not text:
        found.append("unfilled template")
    words = [w.strip(",;") for w in text.split()]
    for first, second in itertools.pairwise(words):
        if first in PREPOSITIONS | ARTICLES and second in PREPOSITIONS:
            found.append(f"{first!r} before {second!r}")
        if first in ARTICLES and second in ARTICLES:
            found.append(f"{first!r} before {second!r}")
        if first in ("of", "with") and second in shapes.SIZES:
            found.append(f"no article after {first!r}")
        if first == "a" and second[:1] in "aeiou":
            found.append(f"'a {second}'")
    if words and words[-1] in PREPOSITIONS | ARTICLES | {"and"}:
        found.append(f"ends with {words[-1]!r}")
    return found


def test_the_checker_catches_the_reported_defect():
    assert grammar_defects("a picture of in the top left, a large red triangle, gray background")
    assert grammar_defects("an image with large red triangle on the left against gray")
    assert not grammar_defects("a picture of a large red triangle in the top left, gray background")


def test_every_template_and_phrase_form_reads_as_english():
    """Every template x every phrase form of each object x every position, one and two objects."""
    scenes = [
        {"objects": [{"shape": "triangle", "colour": "orange", "size": size, "position": position}],
         "background": "gray"}
        for size in shapes.SIZES for position in shapes.POSITION_NAMES
    ]  # fmt: skip
    scenes += [
        {"objects": [{"shape": "circle", "colour": "red", "size": "small", "position": first},
                     {"shape": "cross", "colour": "blue", "size": "large", "position": second}],
         "background": "white"}
        for first in shapes.POSITION_NAMES for second in shapes.POSITION_NAMES if first != second
    ]  # fmt: skip
    for template in shapes.TEMPLATES:
        for scene in scenes:
            for a in shapes.PHRASE_FORMS:
                for b in shapes.PHRASE_FORMS:
                    text = shapes.fill(template, scene, [a, b][: len(scene["objects"])])
                    assert not grammar_defects(text), (text, grammar_defects(text))


def test_the_dataset_captions_read_as_english():
    """A large seeded sample of what `nas data shapes` writes (the quickstart's 2,000 and more)."""
    texts = [shapes.sample(i, seed=0)[1]["text"] for i in range(3000)]
    bad = [t for t in texts if grammar_defects(t)]
    assert not bad, bad[:5]
    assert {t.split(" ")[0] for t in texts} >= {"a", "an", "on"}  # several templates in use


def test_pixels_show_the_labels():
    # A large object's centre pixel has its colour; a corner far from every object has the background.
    checked = 0
    for index in range(300):
        image, r = shapes.sample(index, size=64, seed=1)
        pixels = np.asarray(image).astype(int)
        for obj in r["objects"]:
            if obj["size"] != "large" or obj["shape"] in ("cross", "triangle"):
                continue  # the centre of a cross arm or triangle can sit near an edge
            row, col = divmod(shapes.POSITION_NAMES.index(obj["position"]), 3)
            y, x = int((row + 0.5) / 3 * 64), int((col + 0.5) / 3 * 64)
            want = np.array(shapes.COLOURS[obj["colour"]])
            assert np.abs(pixels[y, x] - want).max() <= shapes.COLOUR_JITTER + 2
            checked += 1
    assert checked > 50


def test_bad_arguments_are_errors(tmp_path):
    with pytest.raises(NasError, match="--n"):
        shapes.write(tmp_path / "x", n=0)
    with pytest.raises(NasError, match="--size"):
        shapes.write(tmp_path / "x", n=4, size=4)


def test_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--n", "12", "--size", "16", "--seed", "2"]) == 0
    capsys.readouterr()
    before = _files(out)
    assert json.loads(before["shapes.json"])["size"] == 16
    assert main(["data", "shapes", "--out", str(out), "--n", "12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and str(out) in err[0]
    assert _files(out) == before
