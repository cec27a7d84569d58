"""The one training loop: full training (`nas train`) and the search's short proxy runs.

`train(model, cache, config)` takes any U-Net-shaped module (forward(x, t, encoder_hidden_states)
-> .sample) and a latent cache; `train_arch` (the CLI) and `proxy_train` (the search) build the
U-Net from an architecture and call it. Device, autocast and multi-GPU go through accelerate's
`Accelerator`, so `nas train ...` and `accelerate launch -m nas train ...` run the same code.

Per optimizer step: `grad_accum` micro-batches (latents drawn from the cached VAE moments, captions
dropped to the empty caption with probability `cfg_drop`, uniform timesteps), the Min-SNR-weighted
loss of nas/diffusion.py, gradient clipping, AdamW, the LR schedule, and from `ema.start` onward an
EMA update. Validation loss on fixed triples every `val_every` steps; checkpoints every
`checkpoint_every` steps and at the end. With `distill:` the loss is BK-SDM's (nas/train/distill.py)
or, with kind: consistency, the consistency loss (nas/train/consistency.py), whose target network is
updated after each optimizer step and checkpointed with the student.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from nas.core.config import read_yaml, validate
from nas.core.errors import NasError
from nas.core.runfolder import ARCH, CONFIG, SUMMARY, RunFolder, environment, staged_folder
from nas.diffusion import diffusion_loss, noise_scheduler
from nas.models import ship_code
from nas.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from nas.train.config import TrainConfig, check_resumable
from nas.train.consistency import CONSISTENCY_METRICS, Consistency, check_pair, check_teacher_recipe
from nas.train.data import Batches, ValidationSet, batch_loader, check_compatible
from nas.train.distill import Distiller, mixed_precision_dtype, prepare_teacher
from nas.train.metrics import DISTILL_METRICS, METRICS, MetricsLog, plot_losses

# A final validation loss above this multiple of the best one marks the run as diverged (warning,
# summary.json). Seen: SD's recipe at a constant lr 1e-3 went from 0.085 to 0.99 at step ~1,220.
DIVERGED_RATIO = 2.0

# report(step, val_loss) after each validation; returning True stops training (a pruned trial).
# An exception it raises (e.g. optuna.TrialPruned) propagates unchanged.
Report = Callable[[int, float], "bool | None"]


class NonFiniteLoss(NasError):
    """The training loss became NaN or infinite; the last checkpoint on disk is untouched."""


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    val_loss: float  # final validation loss, raw weights (evaluated at the end if not before)
    val_loss_start: float | None  # before the first step (fresh runs with a run folder only)
    val_loss_ema: float | None  # final validation loss, EMA weights (None without EMA)
    samples_per_s: float | None  # training throughput of this session (all processes)
    stopped_early: bool  # `report` asked to stop
    run_dir: Path | None
    # with distillation: mean seconds per optimizer step, and of it in teacher forwards (this session)
    step_s: float | None = None
    teacher_s: float | None = None


def make_accelerator(config: TrainConfig):
    """Accelerator with the config's autocast; `auto`: bf16 (or fp16) on CUDA, fp32 elsewhere."""
    from accelerate import Accelerator

    precision = config.mixed_precision
    if precision == "auto":
        precision = "no"
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        return Accelerator(mixed_precision=precision)
    except ValueError as exc:  # e.g. a second run in one process asking for another precision
        raise NasError(f"mixed_precision: {exc}") from None


def _to(batch: dict, device) -> dict:
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
        b = _to(batch, accelerator.device)
        with accelerator.autocast():
            if consistency is not None:
                losses = consistency.validation_losses(model, b)
            else:
                losses = diffusion_loss(
                    model, scheduler, b["latents"], b["text"], b["noise"], b["timesteps"], gamma
                )
        total += losses.sum()
        count += len(losses)
    model.train(was_training)
    return (accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum")).item()


def _prepare_run(run: Path, config: TrainConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); NasError for a run folder misuse."""
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise NasError(
                f"{run}: no checkpoint to resume from in {run / 'checkpoints'}; run without --resume"
            )
        check_resumable(read_yaml(ckpt / "config.yaml"), config, ckpt / "config.yaml")
        return ckpt
    if list_checkpoints(run):
        raise NasError(f"{run}: holds checkpoints of an earlier run; pass --resume to continue it, or --out")
    return None


def _latest(run: Path | None) -> str:
    saved = latest_checkpoint(run) if run is not None else None
    return f"{saved} (lower lr or set grad_clip, then --resume)" if saved else "none"


def _save_final(run: Path, net, ema) -> None:
    """RUN/final/unet (and unet_ema): save_pretrained folders, staged beside and then renamed; a
    FlexUNet's folders also hold its code (flex_unet.py), for AutoModel without `nas`."""
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


def train(
    model: torch.nn.Module,
    cache,
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    report: Report | None = None,
    quiet: bool = False,
    arch=None,
    teacher: torch.nn.Module | None = None,
) -> TrainResult:
    """Train `model` on `cache` (see nas/train/data.py for the interface); `out`: run folder or None.

    `teacher`: the teacher U-Net when `config.distill` is set (train_arch / proxy_train load it and
    initialise the student from it; here it is only run, frozen, next to `model`).
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    accelerator = make_accelerator(config)
    set_seed(config.seed)  # global RNGs too (dropout, if a model has it); resumed runs restore theirs
    main = accelerator.is_main_process
    cache_name = str(getattr(cache, "path", "cache"))
    check_compatible(dict(getattr(model, "config", None) or {}), cache.manifest, "architecture", cache_name)
    if (config.distill is None) != (teacher is None):
        raise NasError(
            "distill: pass a teacher module together with a config that has distill: (and only then);"
            " train_arch and proxy_train load it from distill.teacher"
        )
    if teacher is not None:
        teacher_config = dict(getattr(teacher, "config", None) or {})
        if config.distill is not None and config.distill.kind == "consistency":
            check_pair(config.distill, dict(getattr(model, "config", None) or {}), teacher_config, "teacher")
        check_compatible(teacher_config, cache.manifest, "teacher", cache_name)
    scheduler = noise_scheduler(config.diffusion)
    gamma = config.diffusion.min_snr_gamma
    steps_t = scheduler.config.num_train_timesteps
    batches = Batches(cache, config, steps_t, accelerator.process_index, accelerator.num_processes)
    val_set = ValidationSet.build(cache, config, steps_t)
    run = Path(out) if out is not None else None
    ckpt = _prepare_run(run, config, resume) if run is not None else None

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not passed through prepare(): accelerate would step it once per process per step.
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
    )
    net = accelerator.unwrap_model(model)
    distiller: Distiller | Consistency | None = None  # the loss terms, the teacher's clock
    consistency: Consistency | None = None
    if config.distill is not None and teacher is not None:
        announce = None if quiet or not main else (lambda line: print(line, file=sys.stderr, flush=True))
        dtype = mixed_precision_dtype(accelerator.mixed_precision)
        if config.distill.kind == "consistency":
            distiller = consistency = Consistency(
                teacher, config.distill, scheduler, net, batches.empty_text, accelerator.device, dtype,
                config.seed, accelerator.process_index,
            )  # fmt: skip
        else:
            distiller = Distiller(teacher, config.distill, net, accelerator.device, dtype, announce)
    beside = consistency.checkpointed() if consistency is not None else None  # saved with the student

    def validation_loss() -> float:
        return evaluate(model, scheduler, val_set, accelerator, config.batch_size, gamma, consistency)

    def make_ema():
        assert config.ema is not None  # called only with EMA configured (or in the checkpoint's config)
        # foreach: one fused kernel per update on GPU; the per-tensor loop is as fast on CPU.
        return EMAModel(net.parameters(), decay=config.ema.decay, foreach=accelerator.device.type == "cuda")

    start, ema = 0, None
    if ckpt is not None:
        start, ema = load_checkpoint(accelerator, ckpt, net, optimizer, lr_scheduler, make_ema, beside)
    metrics = None
    if run is not None and main:
        folder = RunFolder(run).mkdir()
        folder.write_yaml(CONFIG, config)
        if arch is not None:
            folder.write_yaml(ARCH, arch)
        env = environment(
            config.seed,
            accelerator.device,
            processes=accelerator.num_processes,
            mixed_precision=accelerator.mixed_precision,
        )
        folder.write_environment(env, start if ckpt is not None else None)
        columns: tuple[str, ...] = METRICS
        if distiller is not None:
            columns += CONSISTENCY_METRICS if consistency is not None else DISTILL_METRICS
        metrics = MetricsLog(folder.metrics, resume_step=start if ckpt is not None else None, columns=columns)

    ema_start = config.ema_start_step()
    samples_per_step = config.global_batch(accelerator.num_processes)
    bar = tqdm(
        total=config.max_steps, initial=start, disable=quiet or not main, unit="step", dynamic_ncols=True
    )
    interval_loss, interval_steps, interval_time, train_time = 0.0, 0, 0.0, 0.0
    val_loss, val_start, stopped, done = None, None, False, start
    distill_time = [0.0, 0.0, 0]  # seconds in steps, of them in the teacher, steps logged
    if run is not None and ckpt is None:  # a fresh run's metrics start from the untrained model
        val_start = validation_loss()
        if metrics is not None:
            metrics.add(step=0, val_loss=val_start, lr=lr_scheduler.get_last_lr()[0])
    elif metrics is not None:
        val_start = metrics.value_at(0, "val_loss")
    best_val = (val_start if val_start is not None else math.inf, 0)  # lowest validation loss, its step
    pin = accelerator.device.type == "cuda"
    loader = iter(batch_loader(batches, start, config.max_steps, config.num_workers, pin))
    try:
        for step in range(start, config.max_steps):
            if ema_start is not None and ema is None and step >= ema_start:
                ema = make_ema()  # starts from the current weights
            tick = perf_counter()
            step_loss = torch.zeros((), device=accelerator.device)
            for micro in range(config.grad_accum):
                b = _to(next(loader), accelerator.device)
                last = micro == config.grad_accum - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast():
                        if consistency is not None:
                            loss = consistency.loss(model, b, step, micro)
                        elif isinstance(distiller, Distiller):  # weighted task + output KD + feature KD
                            loss = distiller.loss(model, scheduler, b, gamma)
                        else:
                            loss = diffusion_loss(
                                model, scheduler, b["latents"], b["text"], b["noise"], b["timesteps"], gamma
                            ).mean()
                    accelerator.backward(loss / config.grad_accum)
                step_loss += loss.detach() / config.grad_accum
            step_loss = accelerator.reduce(step_loss, "mean").item()
            if not math.isfinite(step_loss):
                raise NonFiniteLoss(
                    f"step {step + 1}: training loss is {step_loss}; stopped before the update."
                    f" Last good checkpoint: {_latest(run)}"
                )
            if config.grad_clip is not None:
                norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                # fp16's gradient scaler skips steps with inf gradients by design; elsewhere it is fatal
                if accelerator.mixed_precision != "fp16" and not math.isfinite(float(norm)):
                    raise NonFiniteLoss(
                        f"step {step + 1}: gradient norm is {float(norm)} (loss {step_loss:.4g});"
                        f" stopped before the update. Last good checkpoint: {_latest(run)}"
                    )
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if consistency is not None:
                consistency.update_target(net)
            if ema is not None:
                ema.step(net.parameters())
            done = step + 1
            elapsed = perf_counter() - tick
            interval_loss, interval_steps = interval_loss + step_loss, interval_steps + 1
            interval_time, train_time = interval_time + elapsed, train_time + elapsed

            val_due = done % config.val_every == 0 or done == config.max_steps
            if val_due:
                val_loss = validation_loss()
                best_val = min(best_val, (val_loss, done))
                if report is not None:
                    stopped = bool(report(done, val_loss))
            if done % config.log_every == 0 or val_due:
                rate = samples_per_step * interval_steps / max(interval_time, 1e-9)
                extra: dict[str, float] = {}
                if distiller is not None:  # every process reduces (a collective), the main one logs
                    extra = distiller.take_terms(lambda value: accelerator.reduce(value, "mean"))
                    extra["step_s"] = interval_time / interval_steps
                    extra["teacher_s"] = distiller.take_teacher_seconds() / interval_steps
                    distill_time[0] += interval_time
                    distill_time[1] += extra["teacher_s"] * interval_steps
                    distill_time[2] += interval_steps
                if metrics is not None:
                    metrics.add(
                        step=done,
                        loss=interval_loss / interval_steps,
                        lr=lr_scheduler.get_last_lr()[0],
                        samples_per_s=rate,
                        val_loss=val_loss if val_due else None,
                        **extra,
                    )
                bar.set_postfix(
                    loss=f"{interval_loss / interval_steps:.4f}",
                    **{"samples/s": f"{rate:.1f}"},
                    val=f"{val_loss:.4f}" if val_loss is not None else "-",
                )
                interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
            bar.update(1)
            if run is not None and (
                done % config.checkpoint_every == 0 or done == config.max_steps or stopped
            ):
                save_checkpoint(
                    accelerator,
                    run,
                    done,
                    net,
                    optimizer,
                    lr_scheduler,
                    ema,
                    config,
                    config.keep_checkpoints,
                    beside,
                )
                if main:
                    plot_losses(run / "metrics.csv", run / "loss.png")
            if stopped:
                break
    finally:
        bar.close()
        if distiller is not None:
            distiller.close()  # the hooks go; the caller keeps a plain model

    if val_loss is None:  # nothing trained in this session (resumed at the end)
        val_loss = validation_loss()
    val_loss_ema: float | None = None
    if ema is not None and not stopped:
        ema.store(net.parameters())
        ema.copy_to(net.parameters())
        val_loss_ema = validation_loss()
        ema.restore(net.parameters())
    session_rate = samples_per_step * (done - start) / train_time if train_time else None
    diverged = val_loss > DIVERGED_RATIO * best_val[0]
    if diverged and main:
        print(
            f"warning: validation loss ended at {val_loss:.4g}, {val_loss / best_val[0]:.1f}x its best "
            f"({best_val[0]:.4g} at step {best_val[1]}): the training diverged; lower lr (or resume from "
            "an earlier checkpoint with a lower lr)",
            file=sys.stderr,
            flush=True,
        )
    if run is not None and main:
        _save_final(run, net, ema)
        RunFolder(run).write_json(
            SUMMARY,
            {
                "step": done,
                "val_loss_start": val_start,
                "val_loss": val_loss,
                "val_loss_ema": val_loss_ema,
                "samples_per_s": session_rate,
                "stopped_early": stopped,
                "best_val_loss": best_val[0],  # this session's (a resumed run starts afresh)
                "best_val_step": best_val[1],
                "diverged": diverged,
            },
        )
        plot_losses(run / "metrics.csv", run / "loss.png")
    accelerator.wait_for_everyone()
    result = TrainResult(done, val_loss, val_start, val_loss_ema, session_rate, stopped, run)
    if distill_time[2]:
        result.step_s = distill_time[0] / distill_time[2]
        result.teacher_s = distill_time[1] / distill_time[2]
    return result


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


def train_arch(
    config: TrainConfig,
    arch_path: str | Path | None = None,
    cache_path: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    teacher=None,
) -> TrainResult:
    """`nas train`: load the architecture and cache, build the U-Net, train into a run folder.

    With `distill:` the teacher is `teacher` ((module, Arch)) or loaded from distill.teacher.
    """
    from accelerate.utils import set_seed

    from nas.space import build_unet, load_arch

    arch_path = arch_path or config.arch
    cache_path = cache_path or config.cache
    if arch_path is None:
        raise NasError("no architecture: pass --arch ARCH.yaml or set arch: in the config")
    if cache_path is None:
        raise NasError(
            "no latent cache: pass --cache CACHE (made by `nas precompute`) or set cache: in the config"
        )
    arch = load_arch(arch_path)
    check_consistency(config, arch)
    run = Path(out) if out is not None else Path("results") / "train" / f"{arch.name}-{config.name}"
    if resume and latest_checkpoint(run) is None:
        raise NasError(f"{run}: no checkpoint to resume from in {run / 'checkpoints'}; run without --resume")
    from nas.data.cache import open_cache

    cache = open_cache(cache_path)
    check_arch_cache(arch, cache.manifest, str(arch_path), str(cache_path))
    # Recorded absolute, so `nas sample RUN` finds the cache from any working directory.
    paths: dict[str, Any] = {"arch": str(Path(arch_path).resolve()), "cache": str(Path(cache_path).resolve())}
    if config.distill is not None:  # a --set path is relative to the working directory
        paths["distill"] = {
            **config.distill.model_dump(),
            "teacher": str(Path(config.distill.teacher).resolve()),
        }
    config = validate(TrainConfig, {**config.model_dump(), **paths}, "config")
    set_seed(config.seed)  # model init is part of the run's randomness
    model = build_unet(arch)
    module = None
    if config.distill is not None:
        module = prepare_teacher(
            config.distill, model, arch, cache, resume=resume, quiet=quiet, given=teacher
        )
    return train(model, cache, config, out=run, resume=resume, quiet=quiet, arch=arch, teacher=module)


def proxy_train(
    arch,
    cache,
    steps: int,
    report: Report | None = None,
    *,
    every: int | None = None,
    config: TrainConfig | None = None,
    seed: int | None = None,
    quiet: bool = True,
    teacher=None,
    record: Callable[[dict[str, Any]], None] | None = None,
) -> float:
    """Short mode for the search: train `arch` for `steps` steps and return the final validation loss.

    `arch`: an Arch or an architecture YAML path; `cache`: a LatentCache or its folder. After every
    `every` steps (default steps // 4) the validation loss goes to `report(step, val_loss)`; if that
    returns True training stops and the last reported loss is returned; if it raises (a pruner's
    exception) the exception propagates. Same loop as `nas train`; no EMA, no files written.
    `config` defaults to the DeciDiffusion recipe with a 10% warm-up. With `distill:` in `config`,
    `teacher` ((module, Arch)) saves loading distill.teacher once per call, and `record` (if given)
    receives the inheritance counts (`inherit_*`) and the distillation timings (`step_s`, `teacher_s`).
    """
    from accelerate.utils import set_seed

    from nas.space import build_unet, load_arch

    if isinstance(arch, str | Path):
        arch = load_arch(arch)
    if isinstance(cache, str | Path):
        from nas.data.cache import open_cache

        cache = open_cache(cache)
    if steps < 1:
        raise NasError(f"proxy_train: steps must be >= 1 (got {steps})")
    base: dict[str, Any] = config.model_dump() if config is not None else {"warmup_steps": steps // 10}
    base.update(max_steps=steps, ema=None, val_every=every or max(1, steps // 4))
    if seed is not None:
        base["seed"] = seed
    config = validate(TrainConfig, base, "proxy_train")
    check_arch_cache(arch, cache.manifest, f"architecture {arch.name}", str(getattr(cache, "path", "cache")))
    check_consistency(config, arch)
    set_seed(config.seed)
    model = build_unet(arch)
    module = None
    if config.distill is not None:  # pass `teacher` to load it once for many trials
        inherited = None if record is None else (lambda report: record(inherit_figures(report)))
        module = prepare_teacher(
            config.distill, model, arch, cache, quiet=quiet, given=teacher, inherited=inherited
        )
    result = train(model, cache, config, out=None, report=report, quiet=quiet, teacher=module)
    if record is not None and result.step_s is not None:
        record({"step_s": result.step_s, "teacher_s": result.teacher_s})
    return result.val_loss


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
