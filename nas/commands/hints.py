"""The `next:` line a command prints: the `nas` commands to type next, built as those commands'
settings models and written back with `to_argv`, so they carry the --study, --storage and --results
the user gave (only those not at their defaults) and run as printed."""

from __future__ import annotations

import shlex

from nas.core.settings import CommandSettings, to_argv


def command_line(settings: CommandSettings) -> str:
    """`nas ...` for these settings, quoted for a POSIX shell (paths with spaces, URLs with `?`)."""
    return shlex.join(["nas", *to_argv(settings)])


def next_line(*commands: CommandSettings) -> str:
    """'next: nas export ...; nas report ...'."""
    return "next: " + "; ".join(command_line(c) for c in commands)
