"""Install hints that keep the installed torch.

`pip install torchmetrics[image]` on a machine with the CPU build of torch 2.13 replaced it with the
newest CUDA build and 4 GB of CUDA libraries: torchvision's newest release pins the newest torch, and
pip upgraded torch to satisfy it. Every hint nas prints therefore names the installed torch too
(`torch==<torch.__version__>`, local label such as `+cpu` included), so pip picks versions of the
other packages that fit it and leaves torch alone. `tests/core/test_install_hints.py` checks that
every hint in nas/ is made here.
"""

from __future__ import annotations

import shlex
from importlib import metadata


def installed_torch() -> str | None:
    """The installed torch's version as pip knows it (e.g. '2.13.0+cpu'), without importing torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def pip_install(*requirements: str) -> str:
    """'pip install REQ... torch==<installed>', quoted for a POSIX shell."""
    pins = [f"torch=={installed_torch()}"] if installed_torch() else []
    return "pip install " + " ".join(shlex.quote(r) for r in (*requirements, *pins))
