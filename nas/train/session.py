"""The pieces of a training session around the loop of nas/train/loop.py: the validation loss,
which checkpoint a run resumes from, the final weights, and the checks made before a model is
built (architecture against cache, consistency distillation's pairing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nas.core.config import read_yaml
from nas.core.errors import NasError
from nas.core.runfolder import RunFolder, staged_folder
from nas.models import ship_code
from nas.train.checkpoint import latest_checkpoint, list_checkpoints, resume_point
from nas.train.config import TrainConfig, check_resumable
from nas.train.consistency import check_pair, check_teacher_recipe
from nas.train.controlnet import task_loss
from nas.train.data import ValidationSet, check_compatible
from nas.train.launch import from_main, say


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model, scheduler, val_set: ValidationSet, accelerator, batch_size: int, gamma, consistency=None
) -> float:
    """Mean validation loss over all fixed triples (each process takes a slice, sums are reduced);
    with `consistency` (a Consistency), its loss instead of the diffusion loss."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for batch in val_set.shard(accelerator.process_index, accelerator.num_processes, batch_size):
        b = to_device(batch, accelerator.device)
        with accelerator.autocast():
            if consistency is not None:
                losses = consistency.validation_losses(model, b)
            else:  # with "cond" in the batch: the U-Net steered by the ControlNet (nas/train/controlnet.py)
                losses = task_loss(model, scheduler, b, gamma)
        total += losses.sum()
        count += len(losses)
    model.train(was_training)
    return (accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum")).item()


def prepare_run(run: Path, config: TrainConfig, resume: bool, accelerator) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); NasError for a run folder misuse.
    The main process picks the newest whole checkpoint (checkpoint.resume_point), says in one line
    which damaged ones it skipped, and tells the other processes."""
    if resume:
        found = None
        if accelerator.is_main_process:
            ckpt, skipped = resume_point(run)
            if skipped:
                bad = "; ".join(f"{path.name} ({reason})" for path, reason in skipped)
                start = ckpt.name if ckpt else "nothing"
                say(accelerator, f"nas train: resuming from {start}: skipped {bad}")
            found = None if ckpt is None else str(ckpt)
        found = from_main(accelerator, found)
        ckpt = None if found is None else Path(found)
        if ckpt is None:
            raise NasError(
                f"{run}: no whole checkpoint to resume from in {run / 'checkpoints'}; run without --resume"
            )
        check_resumable(read_yaml(ckpt / "config.yaml"), config, ckpt / "config.yaml")
        return ckpt
    if list_checkpoints(run):
        raise NasError(f"{run}: holds checkpoints of an earlier run; pass --resume to continue it, or --out")
    return None


def latest_hint(run: Path | None) -> str:
    saved = latest_checkpoint(run) if run is not None else None
    return f"{saved} (lower lr or set grad_clip, then --resume)" if saved else "none"


def save_final(run: Path, net, ema) -> None:
    """RUN/final/unet (and unet_ema): save_pretrained folders, staged beside and then renamed; a
    FlexUNet's folders also hold its code (flex_unet.py), for AutoModel without `nas`."""
    if hasattr(net, "save_final"):  # controlnet: the ControlNet alone (nas/train/controlnet.py)
        return net.save_final(run, ema)
    if not hasattr(net, "save_pretrained"):
        return
    with staged_folder(RunFolder(run).final) as staging:
        net.save_pretrained(staging / "unet", safe_serialization=True)
        ship_code(type(net), staging / "unet")
        if ema is not None:
            ema.store(net.parameters())
            ema.copy_to(net.parameters())
            net.save_pretrained(staging / "unet_ema", safe_serialization=True)
            ship_code(type(net), staging / "unet_ema")
            ema.restore(net.parameters())


def check_arch_cache(arch, manifest: dict, arch_source: str, cache_source: str) -> None:
    """An architecture must fit the cache before any model is built (NasError otherwise)."""
    s = arch.settings
    settings = {
        "in_channels": s.latent_channels,
        "cross_attention_dim": s.cross_attention_dim,
        "sample_size": s.latent_size,
    }
    check_compatible(settings, manifest, arch_source, cache_source)


def check_consistency(config: TrainConfig, arch) -> None:
    """With distill kind: consistency, before anything is built: the student's guidance embedding
    and the recipe the teacher's folder records (nas/train/consistency.py; NasError)."""
    if config.distill is None or config.distill.kind != "consistency":
        return
    check_pair(
        config.distill, {"time_cond_proj_dim": arch.settings.time_cond_proj_dim}, {}, config.distill.teacher
    )
    check_teacher_recipe(config.distill.teacher, config.diffusion)


def inherit_figures(report) -> dict[str, Any]:
    """An InheritReport as flat figures (trial attributes): parameters copied, sliced and new
    (identity-initialised ones included), and the one-line summary."""
    counts = report.counts()
    return {
        "inherit_copied": counts["copied"][1],
        "inherit_sliced": counts["sliced"][1],
        "inherit_new": counts["new"][1] + counts["identity-init"][1],
        "inherit_summary": report.summary(),
    }
