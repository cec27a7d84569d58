"""nas/core/lock.py: one writer per folder, refused in one line naming the holder, a lock that dies
with its process, released (and its file removed) on a normal exit."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nas.core.errors import NasError
from nas.core.lock import FolderLocked, acquire, exclusive, is_primary_rank, lock_path, release

HANG = 60  # seconds: only a hung holder process gets near this

HOLDER = """
import sys, time
from nas.core.lock import exclusive
with exclusive(sys.argv[1], "nas train tiny --out " + sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder_process(repo_root):
    """Start a process that holds the lock of a target; yields a starter, kills what it started."""
    started = []

    def start(target: Path) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(repo_root)}
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(HANG)


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path, holder_process):
    run = tmp_path / "runs" / "r"
    proc = holder_process(run)
    with pytest.raises(FolderLocked) as refused:
        acquire(run)
    message = str(refused.value)
    assert isinstance(refused.value, NasError) and "\n" not in message
    assert message.startswith(f"{run}: in use by pid {proc.pid} on {socket.gethostname()} since ")
    assert f"(nas train tiny --out {run})" in message and str(lock_path(run)) in message
    assert not run.exists()  # the refused writer created nothing; nor did the holder (a lock only)
    info = json.loads(lock_path(run).read_text())
    assert info["pid"] == proc.pid and info["host"] == socket.gethostname() and info["started"]


def test_a_lock_file_left_by_a_killed_holder_blocks_nothing(tmp_path, holder_process):
    run = tmp_path / "r"
    proc = holder_process(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait(HANG)
    assert json.loads(lock_path(run).read_text())["pid"] == proc.pid  # stale file, dead pid
    with exclusive(run) as held:  # the kernel released the flock with the process
        assert held == lock_path(run)
        assert json.loads(held.read_text())["pid"] == os.getpid()
    assert not lock_path(run).exists()  # released on a normal exit, file removed


def test_released_on_exit_and_exceptions_and_taken_again(tmp_path):
    target = tmp_path / "table.json"  # a file target: the lock sits beside it too
    with pytest.raises(RuntimeError), exclusive(target):
        assert lock_path(target) == tmp_path / ".table.json.nas.lock"
        with pytest.raises(FolderLocked):  # a second open lock, even in this process
            acquire(target)
        raise RuntimeError("boom")
    assert not lock_path(target).exists()
    fd = acquire(target)
    release(target, fd)
    with exclusive(tmp_path / "new" / "deeper" / "run"):  # the folders it made for its lock file
        assert (tmp_path / "new" / "deeper").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind
    with exclusive(tmp_path / "new" / "run"):
        (tmp_path / "new" / "run").mkdir()  # output: kept, and so is its parent
    assert (tmp_path / "new" / "run").is_dir() and not lock_path(tmp_path / "new" / "run").exists()


def test_a_process_ending_normally_releases_it(tmp_path, repo_root):
    code = "import sys; from nas.core.lock import acquire; acquire(sys.argv[1])"  # never released
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], check=True, env=env, timeout=HANG)
    with exclusive(tmp_path / "r"):
        pass


def test_only_global_rank_0_of_a_multi_process_run_locks(tmp_path, monkeypatch, holder_process):
    for env, primary in [({}, True), ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),
                         ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, False),
                         ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, False),  # 2nd machine
                         ({"LOCAL_RANK": "1"}, False)]:  # fmt: skip
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert is_primary_rank() is primary, env
    run = tmp_path / "r"
    holder_process(run)  # rank 0 of the run holds it
    with exclusive(run, distributed=True) as held:  # rank 1 (env above: LOCAL_RANK=1) takes none
        assert held is None
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(FolderLocked), exclusive(run, distributed=True):
        pass


def test_every_spelling_of_a_folder_shares_one_lock(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    os.symlink(tmp_path, tmp_path / "link")
    with exclusive("../r"):
        for other in (tmp_path / "r", tmp_path / "link" / "r", Path("../a/../r")):
            with pytest.raises(FolderLocked):
                acquire(other)
    start = time.monotonic()
    with exclusive(tmp_path / "r"):
        pass
    assert time.monotonic() - start < 1  # never waits
