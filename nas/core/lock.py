"""One writer per output folder: an exclusive OS lock that dies with its process.

Every command that writes a folder (or a file: a latency table, a SQLite study) holds
`exclusive(target)` for its lifetime: `fcntl.flock(LOCK_EX | LOCK_NB)` on a lock file beside the
target, `<parent>/.<name>.nas.lock`, which holds the holder's pid, host, start time and command as
JSON. A second writer is refused at once, before it writes anything, with one line naming the
holder (a `FolderLocked`, a NasError: exit code 2). Readers (`nas eval`, `nas sample`,
`nas report`, `nas export`) take no lock and never wait.

Why flock: the kernel releases it when the process dies however it dies (SIGKILL, OOM, a power
cut), so a lock file left by a dead process blocks nothing; its content is only the name shown.
Why beside the target, not inside: a command refuses a non-empty `--out` that is not its own kind
(`nas precompute`), moves a folder aside (`nas run`'s redone stages) or replaces it by a rename;
a file inside would be data to all of those, and a refused writer would have created the folder.
The file is removed when the lock is released normally. flock locks the local kernel's view:
on NFS it is only as good as the server's lock support.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nas.core.errors import NasError

SUFFIX = ".nas.lock"
READ_WAIT_S = 1.0  # a holder writes its JSON right after taking the lock: wait this long for it


class FolderLocked(NasError):
    """Another process writes this folder (or file) now."""


def lock_path(target: str | Path) -> Path:
    """The lock file of `target`: `.<name>.nas.lock` beside it (the path resolved, so that every
    spelling of one folder shares one lock)."""
    target = Path(target).resolve()
    return target.with_name(f".{target.name}{SUFFIX}")


def is_primary_rank() -> bool:
    """False in the processes of a multi-process run (torchrun, `accelerate launch`) other than
    global rank 0: RANK (global), else LOCAL_RANK; a single process has neither."""
    rank = os.environ.get("RANK")
    if rank is not None:
        return rank.strip() == "0"
    return os.environ.get("LOCAL_RANK", "0").strip() == "0"


def holder(path: Path) -> dict[str, Any]:
    """The JSON a holder wrote into lock file `path` ({} if unreadable)."""
    deadline = time.monotonic() + READ_WAIT_S
    while True:
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process (its details are not written yet)"
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"
        f" ({info.get('command', '?')})"
    )


def _record(command: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or " ".join(["nas", *sys.argv[1:]]),
    }


def acquire(target: str | Path, command: str | None = None) -> int:
    """Take the lock of `target`; return its file descriptor (keep it open to hold the lock).
    FolderLocked if another open lock holds it (another process, or another `acquire` in this
    one: locks are per open file)."""
    path = lock_path(target)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # another writer's release removed the empty parent just now
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_empty(made)
            raise FolderLocked(
                f"{Path(target)}: in use by {describe(holder(path))}; wait for it to finish or stop it"
                f" (lock file {path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the file between our open and our flock: then
        # we locked a file no one else can see; lock the one that is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    data = (json.dumps(_record(command)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    _made[fd] = made
    return fd


_made: dict[int, list[Path]] = {}  # descriptor -> the folders its acquire() created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (innermost first) that are still empty: a command that stopped before
    writing (a bad plan, a refusal) leaves nothing behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: it holds output now, and so do its parents


def release(target: str | Path, fd: int) -> None:
    """Remove the lock file (while still holding it) and release the lock."""
    try:
        lock_path(target).unlink(missing_ok=True)
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the flock
    _remove_empty(_made.pop(fd, []))


@contextmanager
def exclusive(
    target: str | Path | None, command: str | None = None, distributed: bool = False
) -> Iterator[Path | None]:
    """Hold the lock of `target` (a folder or a file, existing or not) for the `with` block;
    yields the lock file. `target` None: nothing to lock. `distributed`: in a multi-process run
    only global rank 0 takes it (the other ranks write nothing of their own)."""
    if target is None or (distributed and not is_primary_rank()):
        yield None
        return
    fd = acquire(target, command)
    try:
        yield lock_path(target)
    finally:
        release(target, fd)
