"""Checkpoints that survive a crash mid-write, and resume to the same weights.

A checkpoint is a folder RUN/checkpoints/step_NNNNNN/ holding
    model.safetensors   raw weights (+ config.json when the model has a diffusers config)
    ema.safetensors     EMA weights by parameter name (only once the EMA has started)
    <name>.safetensors  further networks the run trains alongside (`extra`: consistency
                        distillation's target network, target.safetensors)
    optimizer.pt        AdamW state      } torch.save of plain tensors and numbers, loaded back
    lr_scheduler.pt     LambdaLR state   } with weights_only=True (no pickled code)
    rng_<rank>.pt       torch / CUDA / numpy / random states of each process
    state.json          step, EMA settings and counters
    config.yaml         the resolved TrainConfig
It is written as step_NNNNNN.tmp/, every file fsynced, then renamed: a process killed mid-write
leaves a .tmp folder that is ignored and overwritten, and never touches the previous checkpoint.

Why not `accelerator.save_state`: it pickles RNG states and custom objects (loaded back with
weights_only=False), and our EMA exists only for the last phase of training, which its fixed list
of registered objects does not allow.
"""

from __future__ import annotations

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
    """Write the checkpoint of `step` atomically; every process calls this (each saves its RNG).
    `extra`: name -> module, each saved as <name>.safetensors."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-write
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
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
        state = {
            "step": step,
            "processes": accelerator.num_processes,
            "ema": ema_meta(ema) if ema is not None else None,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        dump_yaml(config, tmp / "config.yaml")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
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
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


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
