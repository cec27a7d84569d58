"""SIGINT and SIGTERM for the length of a `with` block: the one piece `nas train`
(nas/train/interrupt.py: finish the step, checkpoint, exit) and `nas search` (nas/search/interrupt.py:
fail and re-enqueue the running trial) share. Handlers are installed on the main thread only (Python
delivers signals there; elsewhere nothing is installed and Python's defaults apply) and the previous
ones are restored on exit. Exit codes follow the shell's convention, 128 + the signal number: 130 for
SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process stopped by `signum` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class SignalBlock:
    """Base of a `with` block that catches SIGINT and SIGTERM: a subclass's `_handle(signum, frame)`
    runs on either; `signum` holds the first one received (None: none). `_restore(handler)` chooses
    what each signal gets back on exit (by default what it had before)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # signal -> the handler to restore

    def __enter__(self) -> Any:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():  # None: one not set from Python, the default
            restored = self._restore(handler)
            signal.signal(sig, signal.SIG_DFL if restored is None else restored)
        self._previous.clear()

    def _restore(self, handler: Any) -> Any:
        return handler

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        raise NotImplementedError
