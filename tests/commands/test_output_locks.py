"""Two writers on one output folder, for every command that writes one (nas train, precompute,
search, latency-table, run): the second is refused with exit code 2 in one line naming the
holder, before it writes anything, and the first finishes with the same output as a run alone.
Readers (nas eval, nas report, nas run --dry-run) work while a writer holds the folder.

The first writer runs in a thread of this process and is held just after it takes its lock (so
the second always meets it mid-run, whatever the machine's speed); locks are per open file, so a
second writer in the same process is refused exactly as another process would be
(tests/core/test_lock.py shows the cross-process case)."""

import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nas.core.lock as lock
from nas.cli import main
from tests.fixtures.sample import ARCHS

HANG = 300  # seconds: only a hung writer gets near this


@pytest.fixture
def first_writer(monkeypatch):
    """`start(argv)`: run `nas ARGV` in a thread that stops right after taking its lock;
    returns `finish()`, which lets it go on and returns its exit code."""

    def start(argv: list[str]):
        held, go, result = threading.Event(), threading.Event(), {}
        original = lock.exclusive

        @contextmanager
        def exclusive_then_wait(*args, **kwargs):
            with original(*args, **kwargs) as path:
                if threading.current_thread() is thread and path is not None:
                    held.set()
                    go.wait(HANG)
                yield path

        def run():
            try:
                result["code"] = main(argv)
            finally:
                held.set()  # failed before its lock: do not leave the test waiting

        monkeypatch.setattr(lock, "exclusive", exclusive_then_wait)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert held.wait(HANG) and thread.is_alive(), f"the first writer ended early: {result}"

        def finish() -> int:
            go.set()
            thread.join(HANG)
            monkeypatch.setattr(lock, "exclusive", original)
            return result["code"]

        return finish

    return start


def refused(argv: list[str], target: Path, capsys) -> None:
    """`nas ARGV` is refused: exit 2, one line naming the target and this process (the holder)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"error: {target}: in use by pid {os.getpid()} on " in err, err
    assert str(lock.lock_path(target)) in err


def _train_argv(world, out: Path) -> list[str]:
    return ["train", "tiny", "--arch", str(ARCHS / "tiny_stock.yaml"), "--cache", str(world.cache),
            "--out", str(out), "--max-steps", "3", "--set", "val_items=8", "val_timesteps=1",
            "batch_size=4", "warmup_steps=1", "val_every=3", "--quiet"]  # fmt: skip


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run / "final" / "unet").glob("*.safetensors")))


def test_train_second_writer_refused_first_unharmed(sample_world, tmp_path, first_writer, capsys):
    run, alone = tmp_path / "run", tmp_path / "alone"
    finish = first_writer(_train_argv(sample_world, run))
    refused(_train_argv(sample_world, run), run, capsys)
    assert not run.exists()  # the refused writer wrote nothing (the first is held before writing)
    assert finish() == 0
    assert main(_train_argv(sample_world, alone)) == 0
    steps = [line.split(",")[:3] for line in (run / "metrics.csv").read_text().splitlines()]
    assert steps == [line.split(",")[:3] for line in (alone / "metrics.csv").read_text().splitlines()]
    assert len({row[0] for row in steps}) == len(steps)  # each step once (before: every step twice)
    mine, theirs = _weights(run), _weights(alone)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not lock.lock_path(run).exists()


def test_readers_work_while_a_training_holds_its_run(sample_world, tmp_path, capsys):
    with lock.exclusive(sample_world.run_stock):  # a writer (a resumed training) holds the run
        out = tmp_path / "samples"
        argv = ["sample", str(sample_world.run_stock), "--prompt", "a red circle", "--steps", "1",
                "--n", "1", "--out", str(out)]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        assert any(out.glob("*.png"))


def _precompute_argv(world, out: Path) -> list[str]:
    return ["precompute", "--data", str(world.shapes / "train"), "--vae", str(world.vae),
            "--out", str(out), "--resolution", "32", "--batch", "8", "--shard-size", "16",
            "--device", "cpu"]  # fmt: skip


def test_precompute_second_writer_refused_first_unharmed(sample_world, tmp_path, first_writer, capsys):
    cache, alone = tmp_path / "cache", tmp_path / "alone"
    finish = first_writer(_precompute_argv(sample_world, cache))
    refused(_precompute_argv(sample_world, cache), cache, capsys)
    assert not cache.exists()
    assert finish() == 0
    assert main(_precompute_argv(sample_world, alone)) == 0
    shards = sorted(p.relative_to(cache) for p in cache.rglob("*.safetensors"))
    assert shards and shards == sorted(p.relative_to(alone) for p in alone.rglob("*.safetensors"))
    for rel in shards:
        assert (cache / rel).read_bytes() == (alone / rel).read_bytes()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count"] == json.loads((alone / "manifest.json").read_text())["count"]


def _search_argv(space, cache, results: Path, *extra) -> list[str]:
    return ["search", str(space), "--study", "s", "--trials", "3", "--cache", str(cache),
            "--sampler", "random", "--results", str(results), "--quiet", *extra]  # fmt: skip


def _trials(results: Path, storage: str | None = None) -> list[tuple]:
    from nas.search.study import load_study

    study = load_study("s", storage=storage, results=str(results))
    return [(t.number, t.state.name, t.params, t.values) for t in study.get_trials()]


def test_search_second_writer_refused_first_unharmed(
    synthetic, table_space, search_cache, memory_tmp, first_writer, capsys
):
    space, results, alone = table_space("lock"), memory_tmp / "results", memory_tmp / "alone"
    finish = first_writer(_search_argv(space, search_cache, results))
    refused(_search_argv(space, search_cache, results), results / "s", capsys)
    assert not (results / "s").exists()
    assert finish() == 0
    assert main(_search_argv(space, search_cache, alone)) == 0
    with lock.exclusive(results / "s"):  # readers (export, report: load_study) while one writes
        assert _trials(results) == _trials(alone) and len(_trials(alone)) == 3


def test_search_sqlite_database_elsewhere_is_locked_too(
    synthetic, table_space, search_cache, memory_tmp, first_writer, capsys
):
    """Another results folder, the same SQLite file: refused on the database."""
    space, db = table_space("db"), memory_tmp / "shared" / "study.db"
    storage = ["--storage", f"sqlite:///{db}"]
    finish = first_writer(_search_argv(space, search_cache, memory_tmp / "a", *storage))
    refused(_search_argv(space, search_cache, memory_tmp / "b", *storage), db, capsys)
    assert not (memory_tmp / "b").exists()
    assert finish() == 0
    assert len(_trials(memory_tmp / "a", f"sqlite:///{db}")) == 3


def test_search_workers_share_their_parents_lock(
    synthetic, table_space, search_cache, memory_tmp, monkeypatch
):
    """An extra local worker (rank > 0 in NAS_SEARCH_RANK) takes no lock: its parent holds it."""
    from nas.commands.search import Settings, locked_paths
    from nas.search.study import RANK_ENV

    settings = Settings(space="x.yaml", study="s", results=str(memory_tmp))
    assert locked_paths(settings) == [memory_tmp / "s"]
    monkeypatch.setenv(RANK_ENV, "1")
    assert locked_paths(settings) == []
    monkeypatch.delenv(RANK_ENV)
    server = Settings(space="x.yaml", study="s", results=str(memory_tmp), storage="postgresql://h/db")
    assert locked_paths(server) == []  # many commands on one server study: by design


@pytest.fixture
def fake_clock(monkeypatch):
    """Block and network timings of nas/cost/table*.py from a fake clock (as tests/fixtures/search.py's
    search_latency_table): instant, and the same in every run."""
    import nas.cost.table as lt
    import nas.cost.table_build as lb
    from nas.cost.blocks import arch_blocks
    from tests.fixtures.search import QuietLoad

    def whole(arch, setup, device, iters, model=None):
        ms = 10.0 + 3.0 * len(arch_blocks(arch))
        return lt.FitPoint(arch=arch.name, blocks_ms=0.0, measured_ms=ms, measured_p90_ms=1.5 * ms)

    monkeypatch.setattr(lt, "_sample_ms", lambda run, inputs, calls, cuda, dev: 1.0)
    monkeypatch.setattr(lt, "OtherLoad", QuietLoad)
    monkeypatch.setattr(lb, "measure_whole", whole)


def test_latency_table_second_writer_refused_first_unharmed(
    space_file, tmp_path, fake_clock, first_writer, capsys
):
    space = space_file("lt")
    table, alone = tmp_path / "tables" / "cpu.json", tmp_path / "alone.json"
    argv = ["latency-table", str(space), "--rounds", "1", "--warmup", "0", "--fit", "2", "--out"]
    finish = first_writer([*argv, str(table)])
    refused([*argv, str(table)], table, capsys)
    assert not table.exists() and not table.with_name("cpu.json.partial").exists()
    assert finish() == 0
    assert main([*argv, str(alone)]) == 0
    mine, theirs = json.loads(table.read_text()), json.loads(alone.read_text())
    for key in ("build_seconds", "created", "environment"):
        mine.pop(key, None), theirs.pop(key, None)
    assert mine == theirs
    assert sorted(p.name for p in table.parent.iterdir()) == ["cpu.json"]  # no lock file left


def test_run_second_writer_refused_before_writing_and_dry_run_reads(tmp_path, capsys):
    from tests.pipeline.test_pipeline import tiny_experiment, write

    path, results = write(tmp_path, tiny_experiment(tmp_path)), tmp_path / "r"
    with lock.exclusive(results / "tiny"):  # a `nas run` of this experiment holds its folder
        refused(["run", path, "--results", str(results)], results / "tiny", capsys)
        assert sorted(p.name for p in results.iterdir()) == [".tiny.nas.lock"]  # nothing written
        assert main(["run", path, "--results", str(results), "--dry-run"]) == 0  # a reader
    assert not results.exists()  # made for the lock file only, and removed with it
