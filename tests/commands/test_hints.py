"""Lines that give the answer, through the `nas` command line: the `next:` commands repeat the
--storage and --results a search was given and run as printed; a typo in a train config, a `--set`
override or an experiment file names the key it meant (exit 2, one line)."""

import shlex

import pytest

from nas.cli import main
from nas.commands.search import next_hint
from nas.search.settings import SearchSettings
from tests.pipeline.test_pipeline import tiny_experiment, write


def next_commands(out: str) -> list[list[str]]:
    """The argv of each command on the one `next:` line of a command's output."""
    lines = [line for line in out.splitlines() if line.startswith("next: ")]
    assert len(lines) == 1, out
    commands = [shlex.split(c) for c in lines[0].removeprefix("next: ").split("; ")]
    assert all(c[0] == "nas" for c in commands)
    return [c[1:] for c in commands]


def test_search_hints_keep_storage_and_results_and_run_as_printed(
    table_space, search_cache, memory_tmp, capsys
):
    """A real search (4 proxy steps a trial, latency from a table): export needs its figures."""
    results = memory_tmp / "my results"  # a space: the hint must quote it
    url = f"sqlite:///{memory_tmp / 'elsewhere.db'}"  # not RESULTS/h/study.db: without --storage, no study
    argv = ["search", str(table_space("hints")), "--study", "h", "--trials", "2", "--cache", str(search_cache),
            "--results", str(results), "--storage", url]  # fmt: skip
    assert main(argv) == 0
    export, report = next_commands(capsys.readouterr().out)
    where = ["--storage", url, "--results", str(results)]
    assert export == ["export", "--study", "h", *where, "--out", str(results / "h" / "export")]
    assert report == ["report", "--study", "h", *where]
    assert main(export) == 0 and (results / "h" / "export" / "arch.yaml").is_file()
    assert main(report) == 0 and (results / "h" / "summary.md").is_file()
    assert next_commands(capsys.readouterr().out) == [export]  # the report's own hint: the same export
    # the flags are needed: the study is not in the default storage under --results
    assert main(["export", "--study", "h", "--results", str(results), "--out", str(memory_tmp / "x")]) == 2


def test_default_flags_are_left_out_of_the_hint():
    assert next_hint(SearchSettings(space="s.yaml", study="s")) == (
        "next: nas export --study s --out results/s/export; nas report --study s"
    )
    hint = next_hint(SearchSettings(space="s.yaml", study="s", results="runs"))
    assert (
        hint
        == "next: nas export --study s --results runs --out runs/s/export; nas report --study s --results runs"
    )


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_train_config_typo_names_the_key_it_meant(write_yaml, capsys):
    path = write_yaml("preset: tiny\nwarmup_step: 5\n")
    err = refused(capsys, ["train", str(path), "--dry-run"])
    assert f"{path}: warmup_step: unknown key; did you mean `warmup_steps`?" in err, err
    err = refused(capsys, ["train", "tiny", "--set", "lr_schedul=linear", "--dry-run"])
    assert "--set: lr_schedul: unknown key; did you mean `lr_schedule`?" in err, err


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        # `search` is required: its typo used to read 'search: required key missing [+1 more error]'
        (lambda e: e.update(serach=e.pop("search")), "serach: unknown key; did you mean `search`?"),
        (lambda e: e["train"].update(max_step=e["train"].pop("max_steps")),
         "train.max_step: unknown key; did you mean `max_steps`?"),
        (lambda e: e["vae"]["args"].update(step=10), "vae.args.step: unknown setting; did you mean `steps`?"),
    ],
    ids=["top level", "stage", "stage args"],
)  # fmt: skip
def test_experiment_typo_names_the_key_it_meant(tmp_path, capsys, change, needle):
    exp = tiny_experiment(tmp_path)
    exp["vae"]["args"] = {"batch": 8}
    change(exp)
    path = write(tmp_path, exp)
    err = refused(capsys, ["run", path, "--results", str(tmp_path / "r"), "--dry-run"])
    assert f"{path}: {needle}" in err and "more error" not in err, err
