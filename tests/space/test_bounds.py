"""Ranges of the space and architecture formats (nas/core/limits.py), and counting by arithmetic."""

import json
import re
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from nas.core import limits as L
from nas.core.config import validate
from nas.space import canonical, extreme_archs, load_arch, load_space, space_size
from nas.space.schema import Space
from tests.fixtures.space import SPACES
from tests.space.test_space import _space_text, assert_space_refused, enumerate_space

ROOT = Path(__file__).resolve().parents[2]

# (override of tiny.yaml, substrings of the one-line message)
OUT_OF_RANGE_SPACES = [
    ({"levels.0.resnets": {"min": 1, "max": 100_000}}, ["levels.0.resnets", f"1..{L.MAX_RESNETS}"]),
    ({"levels.0.attentions": {"min": 0, "max": 10**12}}, ["levels.0.attentions"]),
    ({"levels.0.up_attentions": {"min": 0, "max": 65}}, ["up_attentions", f"0..{L.MAX_ATTENTIONS}"]),
    ({"levels.0.channels": [16, 16384]}, ["levels.0.channels", f"1..{L.MAX_CHANNELS}"]),
    ({"levels.0.channels": list(range(8, 8 * 66, 8))}, ["levels.0.channels", f"at most {L.MAX_CHOICES}"]),
    ({"depth": {"min": 1, "max": 9}}, ["depth", f"1..{L.MAX_LEVELS}"]),
    ({"depth": {"min": 0, "max": 2}}, ["depth", "1..8"]),
    ({"mid": {"resnets": {"min": 1, "max": 11}}}, ["mid.resnets"]),
    ({"mid": {"attentions": {"min": 0, "max": 10**12}}}, ["mid.attentions"]),
    ({"settings.latent_size": 512}, ["settings.latent_size", str(L.MAX_LATENT_SIZE)]),
    ({"settings.text_len": 100_000}, ["settings.text_len", str(L.MAX_TEXT_LEN)]),
    ({"budgets": {"params": float("nan")}}, ["budgets.params", "finite"]),
    ({"latency": {"iters": 10**9}}, ["latency.iters"]),
    ({"proxy": {"steps": 10**12}}, ["proxy.steps"]),
    ({"proxy": {"seed": -1}}, ["proxy.seed"]),
]


@pytest.mark.parametrize(("overrides", "needles"), OUT_OF_RANGE_SPACES)
def test_out_of_range_space_fields_are_refused(write_yaml, overrides, needles):
    assert_space_refused(write_yaml, overrides, needles)


ARCH = "levels: [{channels: 32, resnets: 1, attentions: 1, heads: 8}]\n"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (ARCH + "mid: {attentions: 1000000000000}\n", "mid.attentions"),
        (ARCH + "mid: {resnets: 100000}\n", "mid.resnets"),
        (ARCH.replace("attentions: 1", "attentions: 100000"), "levels.0.attentions"),
        (ARCH.replace("heads: 8", "heads: 256"), "levels.0.heads"),
        (ARCH + "settings: {cross_attention_dim: 100000}\n", "settings.cross_attention_dim"),
        ("levels: [" + ", ".join(["{channels: 32, resnets: 1}"] * 9) + "]\n", "levels"),
    ],
)
def test_out_of_range_arch_fields_exit_2_in_one_line(capsys, write_yaml, text, field):
    path = write_yaml(text)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f": {field}: " in err, err


def test_the_limits_admit_every_shipped_file():
    for path in sorted(SPACES.glob("*.yaml")):
        load_space(path)
    for path in sorted((SPACES / "archs").glob("*.yaml")):
        load_arch(path)


def _space(levels, depth, mid) -> Space:
    settings = {"latent_size": 8, "norm_num_groups": 8, "cross_attention_dim": 32, "text_len": 4}
    data = {"name": "t", "settings": settings, "depth": depth, "levels": levels, "mid": mid}
    return validate(Space, data, "test")


def test_size_counts_the_lowest_levels_heads_under_a_mid_block_with_attention():
    """Several head choices, a mirrored and a searched up path, an optional mid block with and
    without attention: the arithmetic count equals exhaustive enumeration of distinct points."""
    space = _space(
        [
            {
                "channels": [16, 32],
                "resnets": {"min": 1, "max": 2},
                "attentions": {"min": 0, "max": 2},
                "heads": [1, 2],
            },
            {
                "channels": [32],
                "resnets": {"min": 1, "max": 1},
                "attentions": {"min": 0, "max": 1},
                "up_attentions": {"min": 0, "max": 2},
                "head_dim": [8, 16],
            },
        ],
        {"min": 1, "max": 2},
        {"resnets": {"min": 1, "max": 2}, "attentions": {"min": 0, "max": 2}, "optional": True},
    )
    archs = enumerate_space(space)
    distinct = {yaml.safe_dump(canonical(a)) for a in archs}
    assert len(archs) == len(distinct) == space_size(space) == 1776


def _huge_space() -> Space:
    level = {
        "channels": list(range(128, L.MAX_CHANNELS + 1, 128)),  # 64 choices
        "resnets": {"min": 1, "max": L.MAX_RESNETS},
        "attentions": {"min": 0, "max": L.MAX_ATTENTIONS},
        "up_attentions": {"min": 0, "max": L.MAX_ATTENTIONS},
        "heads": [1, 2, 4, 8, 16, 32, 64, 128],
    }
    mid = {"resnets": {"min": 1, "max": L.MAX_MID_RESNETS}, "attentions": {"min": 0, "max": L.MAX_ATTENTIONS}}
    settings = {"latent_size": 128, "norm_num_groups": 32}
    data = {"name": "huge", "settings": settings, "depth": {"min": 1, "max": L.MAX_LEVELS}}
    return validate(Space, {**data, "levels": [level] * L.MAX_LEVELS, "mid": {**mid, "optional": True}}, "t")


def test_an_astronomically_large_space_is_counted_and_bounded_without_enumeration():
    space = _huge_space()
    attention_pairs = (L.MAX_ATTENTIONS + 1) ** 2
    plain = 64 * L.MAX_RESNETS * (1 + (attention_pairs - 1) * 8)  # (0, 0) attention: heads unused
    always = 64 * L.MAX_RESNETS * attention_pairs * 8
    mid_plain, mid_attention = 1 + L.MAX_MID_RESNETS, L.MAX_MID_RESNETS * L.MAX_ATTENTIONS
    expected = sum(
        plain ** (d - 1) * (mid_plain * plain + mid_attention * always) for d in range(1, L.MAX_LEVELS + 1)
    )
    assert space_size(space) == expected > 10**60
    extremes = extreme_archs(space)
    assert [d for d, _, _ in extremes] == list(range(1, L.MAX_LEVELS + 1))
    _, small, large = extremes[-1]
    assert {lv.channels for lv in small.levels} == {128} and small.mid is None
    assert {(lv.channels, lv.resnets, lv.attentions) for lv in large.levels} == {
        (L.MAX_CHANNELS, L.MAX_RESNETS, L.MAX_ATTENTIONS)
    }
    assert large.mid is not None and large.mid.attentions == L.MAX_ATTENTIONS


def test_inspect_answers_for_a_space_of_billions_of_points(capsys, write_yaml):
    """Many choices, small extremes: `nas inspect` costs two models, never the points."""
    level = {"channels": list(range(8, 8 * 65, 8)), "resnets": {"min": 1, "max": 2},
             "attentions": {"min": 0, "max": 2}, "up_attentions": {"min": 0, "max": 2}, "head_dim": [8]}  # fmt: skip
    text = _space_text(**{"depth": {"min": 3, "max": 3}, "settings.latent_size": 8, "levels": [level] * 3})
    assert main(["inspect", str(write_yaml(text)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == space_size(load_space(write_yaml(text))) > 10**9
    assert report["params_range"][0] < report["params_range"][1]


def test_readme_states_every_limit():
    """The table of ranges (docs/formats.md) names each constant of nas/core/limits.py with its value."""
    readme = (ROOT / "docs" / "formats.md").read_text()
    for name in (n for n in dir(L) if n.startswith("MAX_")):
        value = getattr(L, name)
        shown = f"{value:,}" if isinstance(value, int) or value.is_integer() else f"{value:g}"
        shown = shown.removesuffix(".0")
        assert re.search(rf"`{name}`[^\n]*\b{re.escape(shown)}\b", readme), f"README: {name} = {shown}"
