"""The one user-facing error type: the CLI prints it as one line and exits with code 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2  # bad input: config, file, flag; never a traceback


class NasError(Exception):
    """A mistake in what the user handed us (file, field, flag), explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def where(path: object | None, field: str | None = None) -> str:
    """'FILE: field' prefix shared by every message that points into a file."""
    parts = [str(p) for p in (path, field) if p not in (None, "")]
    return ": ".join(parts)
