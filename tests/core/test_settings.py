"""Command settings (nas/core/settings.py): flags come from one pydantic model per command, choices from
`Literal`, one-line errors naming the flag and the allowed values, `--dry-run` that does no work,
and the command line `nas run` shows for a model parses back to the same model."""

import argparse
import json
from typing import Literal

import pytest

from nas.cli import build_parser, main
from nas.core.errors import NasError
from nas.core.settings import CommandSettings, add_arguments, arg, comma_list, from_namespace, to_argv


class Toy(CommandSettings):
    command = ("toy",)
    source: str = arg(help="input file", positional=True)
    colour: Literal["red", "green"] = arg("red", "paint")
    count: int = arg(3, "how many", ge=1, le=10)
    sizes: list[int] = arg([8], "sizes, comma-separated")
    loud: bool = arg(False, "shout")
    start: str | None = arg(None, "first step", flag="--from")

    _commas = comma_list("sizes")


def parse(*argv: str) -> Toy:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, Toy)
    return from_namespace(Toy, parser.parse_args(list(argv)))


def test_flags_types_defaults_and_lists_come_from_the_model():
    s = parse("in.yaml", "--colour", "green", "--sizes", "8,16", "32", "--loud", "--from", "b")
    assert s == Toy(source="in.yaml", colour="green", sizes=[8, 16, 32], loud=True, start="b")
    assert parse("in.yaml") == Toy(source="in.yaml")  # absent flags take the model's defaults
    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    help_text = parser.format_help()
    assert "{red,green}" in help_text and "how many (default 3)" in help_text and "--from" in help_text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("x", "--colour", "blue"), "--colour: unknown value 'blue' (allowed: red, green)"),
        (("x", "--count", "11"), "--count: Input should be less than or equal to 10"),
        (("x", "--sizes", "8,big"), "--sizes[1]: "),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_flag(argv, needle):
    with pytest.raises(NasError) as info:
        parse(*argv)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_bad_choice_of_a_real_command_exits_2_with_allowed_values(capsys, tmp_path):
    code = main(["search", str(tmp_path / "space.yaml"), "--study", "s", "--sampler", "tpee"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--sampler: unknown value 'tpee' (allowed: tpe, nsga2, random, gp)" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["toy", "in.yaml"],
        ["toy", "in.yaml", "--colour", "green", "--sizes", "4", "5", "--loud", "--from", "x", "--count", "9"],
    ],
)
def test_to_argv_parses_back_to_the_same_settings(argv):
    s = parse(*argv[1:])
    assert to_argv(s)[0] == "toy" and parse(*to_argv(s)[1:]) == s


def test_every_command_round_trips_through_its_command_line():
    from nas.commands import eval, search, train

    cases = [
        train.Settings(
            config="tiny", arch="a.yaml", overrides=["lr=2e-3", "ema=null"], max_steps=5, quiet=True
        ),
        eval.Settings(run="r", steps=[30, 10], spacing="leading", weights="raw", evaluator="e"),
        search.Settings(space="s.yaml", study="x", sampler="nsga2", backend="ray", workers=2),
    ]
    parser = build_parser()
    for settings in cases:
        args = parser.parse_args(to_argv(settings))
        assert from_namespace(args._model, args) == settings


def test_search_worker_command_line_is_the_parent_settings():
    """`nas search --workers N` starts N-1 processes with the parent's settings as a command line."""
    from nas.search.settings import SearchSettings

    parent = SearchSettings(
        space="s.yaml", study="x", trials=7, cache="c", sampler="random", seed=3, workers=4
    )
    child = parent.model_copy(update={"storage": "sqlite:///x.db", "seed": 5, "workers": 1})
    args = build_parser().parse_args([*to_argv(child), "--quiet"])
    parsed = from_namespace(args._model, args)
    assert parsed.quiet and parsed.model_dump(include=set(SearchSettings.model_fields)) == child.model_dump()


def test_dry_run_prints_the_settings_and_does_no_work(capsys, tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--n", "12", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 12 and printed["size"] == 32 and not out.exists()
    results = tmp_path / "results"
    from tests.fixtures.space import SPACES

    # the space is read and checked (as the search checks it before its first trial), nothing run
    argv = ["search", str(SPACES / "tiny.yaml"), "--study", "s", "--results", str(results), "--dry-run"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "gp" and not results.exists()


def test_sampler_choices_match_the_sampler_table():
    import typing

    from nas.commands.sample import Scheduler, Spacing, Weights
    from nas.models.load import WEIGHTS
    from nas.sample.components import SCHEDULERS, SPACINGS

    assert typing.get_args(Scheduler) == tuple(SCHEDULERS)
    assert typing.get_args(Spacing) == SPACINGS and typing.get_args(Weights) == WEIGHTS
