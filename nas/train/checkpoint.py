"""Checkpoints that survive a crash mid-write, and resume to the same weights.

A checkpoint is a folder RUN/checkpoints/step_NNNNNN/ holding
    model.safetensors   raw weights (+ config.json when the model has a diffusers config)
    ema.safetensors     EMA weights by parameter name (only once the EMA has started)
    <name>.safetensors  further networks the run trains alongside (`extra`: consistency
                        distillation's target network, target.safetensors)
    optimizer.pt        AdamW state      } torch.save of plain tensors and numbers, loaded back
    lr_scheduler.pt     LambdaLR state   } with weights_only=True (no pickled code)
    rng_<rank>.pt       torch / CUDA / numpy / random states of each process (gathered to the
                        main process, which alone writes the folder)
    state.json          step, EMA settings and counters
    config.yaml         the resolved TrainConfig
It is written as step_NNNNNN.tmp/, every file fsynced, then renamed: a process killed mid-write
leaves a .tmp folder that is ignored and overwritten, and never touches the previous checkpoint.
state.json, written last, records each file's size and sha256: `--resume` checks them
(`check_checkpoint`) and falls back to the newest checkpoint that is whole, moving a damaged one
aside as step_NNNNNN.corrupt/. A write that fails (a full disk: ENOSPC) removes its .tmp folder
and stops the run with one line naming the folder and its free space; the checkpoints before it
are untouched, so `--resume` continues once space is freed. Only then are the oldest checkpoints
beyond `keep` removed.

Why not `accelerator.save_state`: it pickles RNG states and custom objects (loaded back with
weights_only=False), and our EMA exists only for the last phase of training, which its fixed list
of registered objects does not allow.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from nas.core.config import dump_yaml
from nas.core.errors import NasError
from nas.core.runfolder import CHECKPOINTS

_STEP_DIR = re.compile(r"^step_(\d+)$")
CORRUPT = ".corrupt"  # suffix of a damaged checkpoint moved aside by --resume


class CheckpointNotWritten(NasError):
    """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step_{step:06d}"


def list_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (.tmp folders of interrupted writes excluded)."""
    folder = Path(run) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run: Path) -> Path | None:
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every RNG state of this process, as tensors and plain numbers (weights_only-loadable)."""
    state = np.random.get_state()
    assert isinstance(state, tuple)  # legacy=True (the default): (kind, keys, pos, has_gauss, cached)
    kind, keys, pos, has_gauss, cached = state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "random": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))


def ema_meta(ema) -> dict:
    return {key: value for key, value in ema.state_dict().items() if key != "shadow_params"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):  # 16 MiB reads
            digest.update(chunk)
    return digest.hexdigest()


def _free_space(folder: Path) -> str:
    """Free space of the filesystem holding `folder` (or its nearest existing parent), in words."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            free = shutil.disk_usage(candidate).free
            return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"
    return "unknown"


def _write_files(tmp: Path, step: int, model, optimizer, lr_scheduler, ema, config, extra, processes) -> None:
    """The main process's files; state.json (with every file's size and sha256) last."""
    save_model(model, str(tmp / "model.safetensors"))
    for name, module in (extra or {}).items():
        save_model(module, str(tmp / f"{name}.safetensors"))
    save_config = getattr(model, "save_config", None)  # diffusers models: config.json beside
    if save_config is not None:
        save_config(tmp)
    if ema is not None:
        names = [name for name, _ in model.named_parameters()]
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in zip(names, ema.shadow_params)},
            str(tmp / "ema.safetensors"),
        )
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
    dump_yaml(config, tmp / "config.yaml")
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(tmp.iterdir())
        if path.is_file()
    }
    state = {
        "step": step,
        "processes": processes,
        "ema": ema_meta(ema) if ema is not None else None,
        "files": files,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    _fsync_tree(tmp)


def save_checkpoint(
    accelerator,
    run: Path,
    step: int,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    ema,
    config,
    keep: int,
    extra: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically; every process calls this, the main one writes
    (the other processes' RNG states are gathered to it).
    `extra`: name -> module, each saved as <name>.safetensors. CheckpointNotWritten (on every
    process) if a write fails: the .tmp folder is removed, the earlier checkpoints are untouched."""
    from nas.train.launch import gather

    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process

    def attempt(action) -> None:  # every process, in step: the first failure stops them all
        error = None
        try:
            action()
        except OSError as exc:
            error = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        failed = [e for e in gather(accelerator, error) if e is not None]
        if failed:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(run)
            raise CheckpointNotWritten(
                f"{final.parent}: could not write the checkpoint of step {step}: {failed[0]};"
                f" {_free_space(final.parent)} free there. {previous or 'No earlier checkpoint'}"
                f"{' is intact' if previous else ''}: free space, then rerun with --resume"
            )

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
            tmp.mkdir(parents=True)

    def write() -> None:
        states = gather(accelerator, rng_state())  # every process's RNG, written by the main one
        if main:
            for rank, state in enumerate(states):
                torch.save(state, tmp / f"rng_{rank}.pt")
            _write_files(tmp, step, model, optimizer, lr_scheduler, ema, config, extra,
                         accelerator.num_processes)  # fmt: skip

    def publish() -> None:
        if not main:
            return
        if final.exists():  # the same step saved again: swap, so one of the two is always whole
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_tree(final.parent)
        for _, path in list_checkpoints(run)[:-keep]:
            shutil.rmtree(path)

    for stage in (prepare, write, publish):
        attempt(stage)
    return final


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def check_checkpoint(path: Path) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from (one phrase), or None if it is whole:
    every file state.json lists is there with its size and sha256. A checkpoint written before
    the checksums were recorded: its files are opened instead (safetensors headers, torch.load)."""
    path = Path(path)
    try:
        state = read_state(path)
        files = state.get("files")
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"state.json is unreadable ({type(exc).__name__})"
    if files is None:
        return _check_unlisted(path)
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{name} holds {size} bytes of the {want['bytes']} written (truncated)"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its sha256 (damaged)"
    return None


def _check_unlisted(path: Path) -> str | None:
    from safetensors import safe_open

    for name in ("model.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng_0.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle:
                    handle.get_tensor(key)
        for file in sorted(path.glob("*.pt")):
            torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any library's error on a damaged file
        return f"{file.name} is unreadable ({type(exc).__name__})"
    return None


def resume_point(run: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest whole checkpoint of `run` (None if there is none) and the newer damaged ones,
    each with the reason, after moving them aside to step_NNNNNN.corrupt/ (never resumed from,
    never counted against keep_checkpoints; inspect or delete them)."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(run)):
        reason = check_checkpoint(path)
        if reason is None:
            return path, skipped
        aside = path.with_name(path.name + CORRUPT)
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        skipped.append((aside, reason))
    return None, skipped


def load_checkpoint(
    accelerator,
    path: Path,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    make_ema,
    extra: dict[str, torch.nn.Module] | None = None,
):
    """Restore weights, optimizer, LR schedule, RNG and EMA; returns (step, ema or None).

    `make_ema()` builds a fresh EMAModel on the restored weights; its state is then loaded.
    `extra`: name -> module, each restored from <name>.safetensors (saved with the same `extra`).
    """
    path = Path(path)
    state = read_state(path)
    if state["processes"] != accelerator.num_processes:
        raise NasError(
            f"{path}: saved by {state['processes']} process(es), resumed with {accelerator.num_processes};"
            " resume with the same number of processes (the data order depends on it)"
        )
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise NasError(
            f"{path}: weights do not fit this architecture ({len(missing)} missing,"
            f" {len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[0]})"
        )
    for name, module in (extra or {}).items():
        if not (path / f"{name}.safetensors").is_file():
            raise NasError(
                f"{path}: no {name}.safetensors (saved by a run of another kind); resume with its config"
            )
        missing, unexpected = load_model(module, str(path / f"{name}.safetensors"), strict=False)
        if missing or unexpected:
            raise NasError(f"{path}: {name}.safetensors does not fit this architecture ({len(missing)} missing,"
                           f" {len(unexpected)} unexpected tensors)")  # fmt: skip
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    set_rng_state(torch.load(rng_file, weights_only=True))
    ema = None
    if state["ema"] is not None:
        ema = make_ema()
        shadow = load_file(str(path / "ema.safetensors"))
        names = [name for name, _ in model.named_parameters()]
        device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
        ema.load_state_dict({**state["ema"], "shadow_params": [shadow[n].to(device) for n in names]})
    return state["step"], ema
