"""Error lines of the strict YAML loader (nas/core/config.py) and of command settings
(nas/core/settings.py): an unknown key is reported before the missing keys it causes, with the
allowed key it is closest to, or with every allowed key when none is close."""

import pytest

from nas.core.config import Strict, closest, validate
from nas.core.errors import NasError
from nas.core.settings import CommandSettings, arg, build


class Level(Strict):
    channels: int
    resnets: int
    attentions: int = 0


class Mid(Strict):
    resnets: int = 2


class Doc(Strict):
    name: str
    levels: list[Level]
    mid: Mid | None = None


LEVEL = {"channels": 8, "resnets": 1}


def message(data: dict) -> str:
    with pytest.raises(NasError) as info:
        validate(Doc, data, "f.yaml")
    text = str(info.value)
    assert "\n" not in text
    return text


def test_a_typo_is_reported_before_the_key_it_leaves_missing():
    """The user's case: `resnet` for `resnets` at levels.2 used to read 'levels.2.resnets: required
    key missing [+1 more error]'. The missing `resnets` is the typo's doing: no second error."""
    levels = [LEVEL, LEVEL, {"channels": 8, "resnet": 2}]
    assert message({"name": "a", "levels": levels}) == (
        "f.yaml: levels.2.resnet: unknown key; did you mean `resnets`?"
    )


def test_other_errors_are_still_counted_after_the_typo():
    levels = [{"channels": "many", "resnets": 1}, {"channels": 8, "resnet": 2}]
    assert message({"name": "a", "levels": levels}) == (
        "f.yaml: levels.1.resnet: unknown key; did you mean `resnets`? [+1 more error]"
    )
    # a typo whose intended key is present too: the key it meant is not missing, nothing dropped
    levels = [{"channels": 8, "resnets": 1, "resnet": 1}]
    assert message({"levels": levels}) == (
        "f.yaml: levels.0.resnet: unknown key; did you mean `resnets`? [+1 more error]"
    )


def test_no_close_key_lists_the_allowed_ones():
    assert message({"name": "a", "levels": [{**LEVEL, "colour": 1}]}) == (
        "f.yaml: levels.0.colour: unknown key (allowed: attentions, channels, resnets)"
    )
    assert message({"name": "a", "levels": [LEVEL], "zzz": 1}) == (
        "f.yaml: zzz: unknown key (allowed: levels, mid, name)"
    )


def test_a_typo_inside_an_optional_section():
    assert message({"name": "a", "levels": [LEVEL], "mid": {"resnet": 1}}) == (
        "f.yaml: mid.resnet: unknown key; did you mean `resnets`?"
    )


def test_missing_key_alone_is_still_named():
    assert (
        message({"name": "a", "levels": [{"channels": 8}]})
        == "f.yaml: levels.0.resnets: required key missing"
    )


def test_closest_is_none_for_an_unrelated_word():
    assert closest("resnet", ["attentions", "channels", "resnets"]) == "resnets"
    assert closest("colour", ["attentions", "channels", "resnets"]) is None


class Toy(CommandSettings):
    command = ("toy",)
    colour: str = arg("red", "paint")
    count: int = arg(3, "how many", ge=1)


@pytest.mark.parametrize(
    ("values", "allowed", "expected"),
    [
        ({"colur": "blue"}, None, "exp.yaml: toy.colur: unknown setting; did you mean `toy.colour`?"),
        ({"colur": "blue"}, ["colour"], "exp.yaml: toy.colur: unknown setting; did you mean `colour`?"),
        ({"wings": 2}, None, "exp.yaml: toy.wings: unknown setting (allowed: toy.colour, toy.count)"),
        # the typo comes first although pydantic reports the bad count before it
        (
            {"count": 0, "colur": "x"},
            None,
            "exp.yaml: toy.colur: unknown setting; did you mean `toy.colour`?",
        ),
    ],
)
def test_settings_name_the_closest_setting(values, allowed, expected):
    with pytest.raises(NasError) as info:
        build(Toy, values, lambda n: f"toy.{n}", "exp.yaml: ", allowed)
    assert str(info.value) == expected
