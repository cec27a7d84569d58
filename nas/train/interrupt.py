"""Ctrl-C and SIGTERM during `nas train`: finish the optimizer step, checkpoint it, exit 130 / 143.

`StopSignals` turns SIGINT and SIGTERM into a flag; the loop reads it once per optimizer step, in
the same all-reduce as the step's loss (so every process of a multi-process run stops after the
same step, whichever of them got the signal), finishes the step, writes a checkpoint at it unless
the newest one is younger than `FRESH_S`, and raises `TrainingInterrupted`: the CLI prints
`nas train: interrupted at step N; resume with --resume: <the command>` and exits 128 + the signal
number (the shell's convention: 130 for SIGINT, 143 for SIGTERM).

A repeat of the signal within `REPEAT_S` of the first is ignored: a launcher forwards the
terminal's Ctrl-C to processes that got it from the terminal already (torchrun does, and kills
them after 30 s). A later one stops at once, as Python's default Ctrl-C does: the checkpoints on
disk stay whole (they are written atomically), only the one being written is lost.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from types import FrameType

from nas.core.signals import SignalBlock, exit_code

FRESH_S = 60.0  # a checkpoint younger than this (seconds) is not rewritten on an interrupt
REPEAT_S = 2.0  # seconds in which a repeated signal counts as the same interrupt


class TrainingInterrupted(KeyboardInterrupt):
    """A training stopped by SIGINT or SIGTERM after a whole optimizer step. `hint`: the line the
    CLI prints; `exit_code`: 128 + the signal number."""

    def __init__(self, signum: int, step: int, hint: str):
        super().__init__(hint)
        self.signum, self.step, self.hint = signum, step, hint

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopSignals(SignalBlock):
    """SIGINT / SIGTERM turned into a flag for the `with` block (nas.core.signals.SignalBlock).
    `signum`: the first signal received, or None."""

    def __init__(self) -> None:
        super().__init__()
        self._first = 0.0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
        elif time.monotonic() - self._first > REPEAT_S:
            raise KeyboardInterrupt  # asked twice: stop now


def resume_command(run: Path) -> str:
    """This command line with --resume (and --out RUN when it had none)."""
    argv = ["nas", *sys.argv[1:]] if Path(sys.argv[0]).name in ("nas", "__main__.py") else list(sys.argv)
    if "--out" not in argv:
        argv += ["--out", str(run)]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(argv)


def interrupted(signum: int, step: int, run: Path | None) -> TrainingInterrupted:
    hint = f"interrupted at step {step}; resume with --resume"
    if run is not None:
        hint += f": {resume_command(run)}"
    return TrainingInterrupted(signum, step, hint)


def checkpoint_is_fresh(path: Path | None) -> bool:
    """The checkpoint folder `path` was completed less than FRESH_S seconds ago."""
    if path is None:
        return False
    try:
        age = time.time() - (path / "state.json").stat().st_mtime
    except OSError:
        return False
    return age < FRESH_S
