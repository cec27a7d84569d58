"""Ctrl-C and SIGTERM in a search mean what a kill means: the trial that was running is failed and
re-enqueued with exactly its parameters, and the next run picks it up first.

`Interrupts` turns SIGINT and SIGTERM into `Interrupted` (a KeyboardInterrupt, so whatever already
handles Ctrl-C handles SIGTERM alike). It raises at once only inside `allow()`: a trial's body
(sampling, measuring, training) and waits. Elsewhere (Optuna asking for a trial or telling its
state, the study being created) the signal is held until the next `check()` or `allow()`, so the
study's bookkeeping is never cut in half: an interrupt between `ask` and the trial's first line
would leave a RUNNING trial that names no worker, which no one could ever fail or retry. Only the
first signal raises; later ones (a second Ctrl-C, the parent forwarding the terminal's Ctrl-C to a
worker that already had it) are ignored while the first one's clean-up runs.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from nas.core.signals import SignalBlock, exit_code


class Interrupted(KeyboardInterrupt):
    """A search stopped by SIGINT or SIGTERM. `retried`: the trials re-enqueued to run first on
    resume; `hint`: the line the CLI prints (set by `nas search`, None: the CLI's default)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.retried: list[int] = []
        self.hint: str | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class Interrupts(SignalBlock):
    """The handlers for the duration of a `with` block (nas.core.signals.SignalBlock). `ignore_after`:
    once interrupted, leave both signals ignored instead of restoring the previous handlers (an
    extra local worker about to exit, which gets a Ctrl-C from the terminal and the same signal
    from its parent, one possibly after it handled the other)."""

    def __init__(self, ignore_after: bool = False) -> None:
        super().__init__()
        self.ignore_after = ignore_after
        self._raised = False
        self._open = 0  # depth of allow() blocks

    def _restore(self, handler: Any) -> Any:
        return signal.SIG_IGN if self.ignore_after and self.signum is not None else handler

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        if self._open:
            self.check()

    def check(self) -> None:
        """Raise `Interrupted` if a signal came and none was raised yet."""
        if self.signum is not None and not self._raised:
            self._raised = True
            raise Interrupted(self.signum)

    @contextmanager
    def allow(self) -> Iterator[None]:
        """A block a signal may cut at any point (a held signal is raised on entry)."""
        self._open += 1
        try:
            self.check()
            yield
        finally:
            self._open -= 1


class _QuietInterruptedTrial(logging.Filter):
    """Optuna logs a trial that raised KeyboardInterrupt as a failure, in two warnings (the first
    with the traceback, then "Trial N failed with value None."); an interrupted trial is reported
    in one line by `nas search` instead, so both are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self._dropped: set[str] = set()  # "Trial N" of the interrupted trials whose first line went

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        head = " ".join(record.getMessage().split()[:2])
        if info and info[0] is not None and issubclass(info[0], KeyboardInterrupt):
            self._dropped.add(head)
            return False
        if head in self._dropped and "failed with value" in record.getMessage():
            self._dropped.discard(head)
            return False
        return True


# The logger of optuna/study/_optimize.py, which logs failed trials (a filter on a logger applies
# to what is logged there, not to what its children propagate).
logging.getLogger("optuna.study._optimize").addFilter(_QuietInterruptedTrial())
