"""Seeded mutations of every shipped YAML file (spaces, architectures, train configs, experiments):
each mutated file is accepted or refused with one line (NasError; exit 2 on the CLI), never a
traceback, never a hang. A SIGALRM guard fails a case that runs past GUARD_S seconds (a hang, not
a slow machine: every case here takes milliseconds)."""

from __future__ import annotations

import copy
import random
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from nas.core.errors import NasError
from nas.pipeline import load_experiment
from nas.space import load_arch, load_space
from nas.train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SEED = 20240611  # fixed: the same mutations on every run
CASES_PER_FILE = 24  # x 17 shipped files ~ 400 cases, a few seconds in all
GUARD_S = 20  # per case; a hang (the bug this guards against) ran for minutes
# Small files whose mutations also go through `nas inspect` (it builds the model: kept cheap).
INSPECTED = {"tiny.yaml", "tiny_stock.yaml", "tiny_flex.yaml", "quickstart_baseline.yaml"}

# Replacement values: far out of range, off by sign, zero, wrong types, non-finite floats.
VALUES = [
    10**12,
    10**30,
    100_000,
    -1,
    0,
    1,
    2.0,
    0.5,
    1e308,
    float("nan"),
    float("inf"),
    -float("inf"),
    "x",
    "",
    [],
    [1, 2],
    None,
    {"a": 1},
    True,
]


def shipped() -> list[tuple[str, Path]]:
    """(kind, path) of every shipped YAML file of the four formats."""
    files = [("space", p) for p in sorted((ROOT / "search_spaces").glob("*.yaml"))]
    files += [("arch", p) for p in sorted((ROOT / "search_spaces" / "archs").glob("*.yaml"))]
    for p in sorted((ROOT / "experiments").glob("*.yaml")):
        files.append(("train" if p.name.startswith("train_") else "experiment", p))
    return files


LOADERS = {
    "space": load_space,
    "arch": load_arch,
    "train": lambda path: load_config(str(path)),
    "experiment": load_experiment,
}


def _nodes(data, path=()):
    """Every (path, value) in a parsed YAML tree, the root included."""
    yield path, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _nodes(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _nodes(value, (*path, i))


def _at(data, path):
    for part in path:
        data = data[part]
    return data


def mutate(data, rng: random.Random) -> tuple[object, str]:
    """One random change to a copy of `data`, and what it was."""
    data = copy.deepcopy(data)
    nodes = list(_nodes(data))
    path, node = rng.choice(nodes)
    op = rng.choice(["replace", "replace", "replace", "delete", "unknown_key", "duplicate", "scale"])
    if op == "unknown_key" and isinstance(node, dict):
        node["no_such_key"] = rng.choice(VALUES)
        return data, f"add unknown key at {path}"
    if op == "duplicate" and isinstance(node, list) and node:
        node.append(copy.deepcopy(rng.choice(node)))
        return data, f"duplicate an item of {path}"
    if not path:  # the root: replace the whole document
        return rng.choice(VALUES), "replace the document"
    parent, key = _at(data, path[:-1]), path[-1]
    if op == "delete":
        del parent[key]
        return data, f"delete {path}"
    if op == "scale" and isinstance(node, int) and not isinstance(node, bool):
        parent[key] = node * rng.choice([1000, 10**6, -1])
        return data, f"scale {path}"
    parent[key] = value = rng.choice(VALUES)
    return data, f"set {path} = {value!r}"


class Hang(Exception):
    pass


@contextmanager
def guard(seconds: int, what: str):
    def _alarm(signum, frame):
        raise Hang(f"{what}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cases() -> list[tuple[str, Path, object, str]]:
    rng = random.Random(SEED)
    out = []
    for kind, path in shipped():
        original = yaml.safe_load(path.read_text())
        for _ in range(CASES_PER_FILE):
            data, what = mutate(original, rng)
            out.append((kind, path, data, what))
    return out


def test_every_format_and_file_is_covered():
    kinds = {kind for kind, _ in shipped()}
    assert kinds == set(LOADERS)
    for kind, path in shipped():  # the unmutated files load
        LOADERS[kind](path)


def test_mutated_files_are_accepted_or_refused_in_one_line(tmp_path, capsys):
    refused = accepted = 0
    for n, (kind, source, data, what) in enumerate(cases()):
        # Same folder name as the original, so relative paths (baselines, presets) still resolve.
        path = tmp_path / f"case{n}" / source.parent.name / source.name
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        label = f"{source.relative_to(ROOT)} [{what}]"
        try:
            with guard(GUARD_S, label):
                LOADERS[kind](path)
            accepted += 1
        except NasError as exc:
            assert "\n" not in str(exc) and str(exc), label
            refused += 1
        except Hang:
            raise
        except Exception as exc:  # any other exception is the failure under test
            pytest.fail(f"{label}: {type(exc).__name__}: {exc}")
        if source.name in INSPECTED and n % 6 == 0:
            capsys.readouterr()
            with guard(GUARD_S, f"nas inspect {label}"):
                code = main(["inspect", str(path)])
            err = capsys.readouterr().err
            assert code in (0, 2), label
            if code == 2:
                assert err.count("\n") == 1 and err.startswith("nas inspect: error: "), (label, err)
            else:
                assert err == "" or "Traceback" not in err, label
    assert refused > 100 and accepted > 10, (refused, accepted)  # both outcomes exercised


@pytest.mark.parametrize(
    "kind, text, message",
    [
        (
            "arch",
            "levels: [{channels: 32, resnets: 1}]\nmid: {attentions: 1000000000000}\n",
            "mid.attentions",
        ),
        (
            "arch",
            "levels: [{channels: 32, resnets: 1, attentions: 100000, heads: 8}]\n",
            "levels.0.attentions",
        ),
        ("arch", "levels: [{channels: 32, resnets: 1}]\nsettings: {text_len: 100000}\n", "settings.text_len"),
        ("arch", "levels: [{channels: 9000000, resnets: 1}]\n", "levels.0.channels"),
        ("train", "lr: .nan\n", "lr"),
        ("train", "lr: .inf\n", "lr"),
        ("train", "batch_size: 1000000000\n", "batch_size"),
        ("train", "max_steps: 100000000000\n", "max_steps"),
        ("train", "seed: -1\n", "seed"),
    ],
)
def test_out_of_range_values_are_refused_in_one_line(tmp_path, kind, text, message):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with guard(GUARD_S, text), pytest.raises(NasError) as err:
        LOADERS[kind](path)
    assert message in str(err.value) and "\n" not in str(err.value)
