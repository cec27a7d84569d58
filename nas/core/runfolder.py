"""The run folder: the names of its files, their atomic writes, and the one environment record.

Every command that leaves a folder behind (`nas train`, `nas search`, `nas sample`, `nas eval`,
`nas run`'s stages) writes through this module, so a file is either its old or its new content,
never half of one, and every folder records its environment the same way. The layout of a
training run:

RUN/
  config.yaml   the resolved config                  arch.yaml    the architecture (if any)
  env.json      environment(): versions, device, seed, command, time
  metrics.csv   step, loss, val_loss, lr, samples_per_s        loss.png  the loss curve
  summary.json  final figures of the command         checkpoints/  see nas/train/checkpoint.py
  final/unet/, final/unet_ema/   save_pretrained weights for the sampler
  stage.json    (`nas run` stage folders only) fingerprint, done, seconds, commands

A base layer: it imports only the standard library and nas.core.config / nas.core.errors, so train, search,
sample, evaluate and pipeline can all use it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
ARCH = "arch.yaml"
ENVIRONMENT = "env.json"
METRICS = "metrics.csv"
LOSS_PLOT = "loss.png"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"  # final/unet and final/unet_ema: the weights for the sampler
STAGE = "stage.json"
SUPERSEDED = ".superseded-"  # <stage>.superseded-<time>/: a redone stage's old folder, moved aside

# The repository root (where pyproject.toml is): paths written into results are relative to it.
REPO = Path(__file__).resolve().parents[2]


# ---- atomic writes -----------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename (os.replace
    is atomic within a file system), on failure it is removed and `path` keeps its old content.
    fsync: flush the data to disk before the rename (for caches that must survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid keeps two writers of the same file apart; the .tmp suffix marks leftovers of a crash
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    write_bytes(path, text.encode("utf-8"), fsync)


def write_json(path: str | Path, data: Any, sort_keys: bool = False, fsync: bool = False) -> None:
    """Indented JSON with a final newline; the text is built before the file is touched, so data
    that does not serialize leaves the old file as it was."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", fsync)


def write_yaml(path: str | Path, data) -> None:
    from nas.core.config import dump_yaml

    write_text(path, dump_yaml(data))


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `out`; on success it becomes `out` (an existing `out` is
    renamed aside first and removed after, so one whole version exists at every moment)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield staging
        old = out.with_name(f".{out.name}.{os.getpid()}.old") if out.exists() else None
        if old is not None:
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- environment -------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(seed: int | None = None, device=None, **extra) -> dict[str, Any]:
    """The environment record of this process: versions, machine, device, command, time, seed.
    `device` (a torch.device or str) adds the CUDA device's name when it is a GPU; `extra` adds
    command-specific fields (e.g. processes and mixed precision of a training)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "diffusers", "accelerate", "optuna")},
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
    }
    if device is not None:
        env["device"] = str(device)
        if str(device).startswith("cuda"):
            import torch

            env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    env.update(
        command=" ".join(sys.argv),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seed=seed,
        **extra,
    )
    return env


# ---- paths in results --------------------------------------------------------------------------


def portable(path: str | Path | None, base: Path = REPO) -> str | None:
    """`path` relative to `base` (the repository root by default) when it lies inside it, so that a
    committed result names no home folder; outside it (e.g. a temporary folder), as given."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def relative_paths(data: Any, base: Path) -> Any:
    """`data` (parsed JSON) with every absolute path inside `base` made relative to `base`, and every
    other one inside the repository made relative to the repository root; others are kept."""
    if isinstance(data, dict):
        return {k: relative_paths(v, base) for k, v in data.items()}
    if isinstance(data, list):
        return [relative_paths(v, base) for v in data]
    if isinstance(data, str) and os.path.isabs(data) and "\n" not in data:
        for root in (base, REPO):
            relative = portable(data, root)
            if relative != data:
                return relative
    return data


# ---- the experiment folder of `nas run` -------------------------------------------------------

MAIN = "main"  # the experiment's own train + evaluate stages (variants have their own names)
EVAL_FILE = "eval.json"  # written by `nas eval` into its --out folder


def run_folder(root: Path, name: str) -> Path:
    """Folder of a trained run in results/<experiment>/: the main one, or variants/<name>/run."""
    return root / "train" / "run" if name == MAIN else root / "variants" / name / "run"


def eval_folder(root: Path, name: str) -> Path:
    """Folder of `nas eval`'s output for a run: the evaluate stage's, or variants/<name>/eval."""
    return root / "evaluate" / "eval" if name == MAIN else root / "variants" / name / "eval"


# ---- the folder --------------------------------------------------------------------------------


class RunFolder:
    """A folder a command writes: named files as attributes, atomic writes by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    config = property(lambda self: self.path / CONFIG)
    arch = property(lambda self: self.path / ARCH)
    environment = property(lambda self: self.path / ENVIRONMENT)
    metrics = property(lambda self: self.path / METRICS)
    loss_plot = property(lambda self: self.path / LOSS_PLOT)
    summary = property(lambda self: self.path / SUMMARY)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    final = property(lambda self: self.path / FINAL)
    stage = property(lambda self: self.path / STAGE)

    def mkdir(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data: Any, sort_keys: bool = False) -> Path:
        write_json(self.path / name, data, sort_keys)
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        write_text(self.path / name, text)
        return self.path / name

    def write_yaml(self, name: str, data) -> Path:
        write_yaml(self.path / name, data)
        return self.path / name

    def read_json(self, name: str, default: Any = None) -> Any:
        return read_json(self.path / name, default)

    def write_environment(self, env: dict[str, Any], resumed_from: int | None = None) -> None:
        """env.json of the first session; each resumed session is appended under "resumes"."""
        first = self.read_json(ENVIRONMENT) if resumed_from is not None else None
        if first is not None:
            first.setdefault("resumes", []).append({**env, "from_step": resumed_from})
            env = first
        self.write_json(ENVIRONMENT, env)

    def set_aside(self) -> Path | None:
        """Move the folder to <name>.superseded-<time> (kept for comparison, never deleted here);
        returns the new path, or None when there was no folder."""
        if not self.path.exists():
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}{SUPERSEDED}{stamp}")
        n = 1
        while target.exists():  # redone twice within a second
            n += 1
            target = self.path.with_name(f"{self.path.name}{SUPERSEDED}{stamp}-{n}")
        self.path.rename(target)
        return target
