"""The one training loop: full training (`nas train`) and the search's short proxy runs.

`train(model, cache, config)` takes any U-Net-shaped module (forward(x, t, encoder_hidden_states)
-> .sample) and a latent cache; `train_arch` (the CLI) and `proxy_train` (the search) build the
U-Net from an architecture and call it. Device, autocast and several processes go through
accelerate's `Accelerator` (nas/train/launch.py), so `nas train ...`, `torchrun -m nas train ...`
and `accelerate launch --multi_gpu -m nas train ...` run the same code; rank 0 alone writes the run
folder. Ctrl-C / SIGTERM: nas/train/interrupt.py; the session's helpers: nas/train/session.py.

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
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch

from nas.core.config import validate
from nas.core.errors import NasError
from nas.core.runfolder import ARCH, CONFIG, SUMMARY, RunFolder, environment
from nas.diffusion import noise_scheduler
from nas.models.load import base_arch
from nas.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nas.train.config import TrainConfig
from nas.train.consistency import CONSISTENCY_METRICS, Consistency, check_pair
from nas.train.controlnet import task_loss, training_data, with_controlnet
from nas.train.data import batch_loader, check_compatible, select_items
from nas.train.distill import Distiller, mixed_precision_dtype, prepare_teacher
from nas.train.interrupt import StopSignals, checkpoint_is_fresh, interrupted
from nas.train.launch import from_main, make_accelerator
from nas.train.lora import add_lora, save_lora
from nas.train.metrics import DISTILL_METRICS, METRICS, MetricsLog, plot_losses
from nas.train.session import check_arch_cache, check_consistency, evaluate, inherit_figures
from nas.train.session import latest_hint as _latest
from nas.train.session import prepare_run as _prepare_run
from nas.train.session import save_final as _save_final
from nas.train.session import to_device as _to
from nas.train.tracking import check_report_to, open_tracking

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
    tracking: tuple[Path, str] | None = None,
    grid: Callable[[torch.nn.Module], Any] | None = None,
) -> TrainResult:
    """Train `model` on `cache` (see nas/train/data.py for the interface); `out`: run folder or None.

    `tracking`: (folder, run name) for `config.report_to` (default with `out`: OUT/tracking, the
    folder's name; without either, nothing is tracked). `grid`: U-Net -> uint8 image, sent to the
    tracker every `config.sample_every` steps (nas/sample/training_grid.py; nas/train/tracking.py).

    `teacher`: the teacher U-Net when `config.distill` is set (train_arch / proxy_train load it and
    initialise the student from it; here it is only run, frozen, next to `model`).
    """
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm import tqdm

    check_report_to(config.report_to)
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
    batches, val_set = training_data(cache, config, steps_t, accelerator)  # controlnet: with conditions
    run = Path(out) if out is not None else None
    ckpt = _prepare_run(run, config, resume, accelerator) if run is not None else None

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # type: ignore[operator]
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
        # Loaded by every process and run frozen beside the student there: never inside DDP.
        assert not isinstance(teacher, torch.nn.parallel.DistributedDataParallel), "teacher in DDP"
        assert not any(p.requires_grad for p in teacher.parameters()), "teacher has trainable weights"
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

    if tracking is None and run is not None:
        tracking = (run / "tracking", run.name)
    tracker = None
    if tracking is not None:
        tracker = open_tracking(
            config.report_to, tracking[0], tracking[1], config.model_dump(mode="json"), main, grid
        )
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
    # Ctrl-C / SIGTERM: finish the step, checkpoint it, stop (nas/train/interrupt.py). Not without a
    # run folder: the search's short runs are interrupted by the search's own handlers.
    signals = StopSignals()
    try:
        if run is not None:
            signals.__enter__()
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
                        else:  # the diffusion loss (with controlnet:, of the U-Net steered by b["cond"])
                            loss = task_loss(model, scheduler, b, gamma).mean()
                    accelerator.backward(loss / config.grad_accum)
                step_loss += loss.detach() / config.grad_accum
            # One all-reduce for the loss and the stop flag: every process stops after the same step.
            flag = torch.tensor(0.0 if signals.signum is None else 1.0, device=accelerator.device)
            summed = accelerator.reduce(torch.stack([step_loss, flag]), "sum")
            step_loss, stop_signal = summed[0].item() / accelerator.num_processes, summed[1].item() > 0
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
                row = dict(
                    loss=interval_loss / interval_steps,
                    lr=lr_scheduler.get_last_lr()[0],
                    samples_per_s=rate,
                    val_loss=val_loss if val_due else None,
                    **extra,
                )
                if metrics is not None:
                    metrics.add(step=done, **row)
                if tracker is not None:
                    tracker.log(row, done)
                bar.set_postfix(
                    loss=f"{interval_loss / interval_steps:.4f}",
                    **{"samples/s": f"{rate:.1f}"},
                    val=f"{val_loss:.4f}" if val_loss is not None else "-",
                )
                interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
            if tracker is not None:  # a sample grid every sample_every steps and at the end
                tracker.sample(net, done, config.sample_every, done == config.max_steps)
            bar.update(1)
            due = done % config.checkpoint_every == 0 or done == config.max_steps or stopped
            if run is not None and stop_signal and not due:  # interrupted: unless one is fresh
                due = not from_main(accelerator, checkpoint_is_fresh(latest_checkpoint(run)))
            if run is not None and due:
                save_checkpoint(accelerator, run, done, net, optimizer, lr_scheduler, ema, config,
                                config.keep_checkpoints, beside)  # fmt: skip
                if main:
                    plot_losses(run / "metrics.csv", run / "loss.png")
            if stop_signal and run is not None and done < config.max_steps:
                raise interrupted(signals.signum or signal.SIGINT, done, run)
            if stopped:
                break
    finally:
        signals.__exit__()
        bar.close()
        if tracker is not None:
            tracker.close()
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
        if config.lora is not None:  # the adapter alone, in diffusers' LoRA format (nas/train/lora.py)
            save_lora(run, net, config.lora)
        else:
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


def train_arch(
    config: TrainConfig,
    arch_path: str | Path | None = None,
    cache_path: str | Path | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    teacher=None,
    sampler=None,
) -> TrainResult:
    """`nas train`: load the architecture and cache, build the U-Net, train into a run folder.

    With `distill:` the teacher is `teacher` ((module, Arch)) or loaded from distill.teacher.
    `sampler(cache, config)`: the sample grid for `sample_every` (nas.sample.TrainingGrid; the
    training floor cannot import the sampler, the command passes it).
    """
    from accelerate.utils import set_seed

    from nas.space import build_unet, load_arch

    check_report_to(config.report_to)  # a missing tracker package: before anything is opened
    addon = config.lora or config.controlnet  # an add-on: the architecture of the run it builds on
    if addon is not None and not (arch_path or config.arch):
        arch_path = base_arch(addon.init_from, "lora.init_from" if config.lora else "controlnet.init_from")
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

    cache = select_items(open_cache(cache_path), config.cache_filter)  # all items without cache_filter
    check_arch_cache(arch, cache.manifest, str(arch_path), str(cache_path))
    # Recorded absolute, so `nas sample RUN` finds the cache from any working directory.
    paths: dict[str, Any] = {"arch": str(Path(arch_path).resolve()), "cache": str(Path(cache_path).resolve())}
    if config.distill is not None:  # a --set path is relative to the working directory
        paths["distill"] = {
            **config.distill.model_dump(),
            "teacher": str(Path(config.distill.teacher).resolve()),
        }
    if config.lora is not None:  # a --set path is relative to the working directory
        paths["lora"] = {**config.lora.model_dump(), "init_from": str(Path(config.lora.init_from).resolve())}
    config = validate(TrainConfig, {**config.model_dump(), **paths}, "config")
    set_seed(config.seed)  # model init is part of the run's randomness
    model = build_unet(arch)
    if config.lora is not None:  # the base run's weights, frozen, and a trainable adapter
        add_lora(model, config.lora, quiet=quiet)
    model = with_controlnet(model, config, cache, quiet)  # controlnet: the base frozen beside a ControlNet
    module = None
    if config.distill is not None:
        module = prepare_teacher(
            config.distill, model, arch, cache, resume=resume, quiet=quiet, given=teacher
        )
    grid = sampler(cache, config) if sampler is not None and config.sample_every else None
    return train(
        model, cache, config, out=run, resume=resume, quiet=quiet, arch=arch, teacher=module, grid=grid
    )


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
    tracking: Path | None = None,
) -> float:
    """Short mode for the search: train `arch` for `steps` steps and return the final validation loss.

    `arch`: an Arch or an architecture YAML path; `cache`: a LatentCache or its folder. After every
    `every` steps (default steps // 4) the validation loss goes to `report(step, val_loss)`; if that
    returns True training stops and the last reported loss is returned; if it raises (a pruner's
    exception) the exception propagates. Same loop as `nas train`; no EMA, no files written.
    `config` defaults to the DeciDiffusion recipe with a 10% warm-up. With `distill:` in `config`,
    `teacher` ((module, Arch)) saves loading distill.teacher once per call, and `record` (if given)
    receives the inheritance counts (`inherit_*`) and the distillation timings (`step_s`, `teacher_s`).
    `tracking`: the folder where a config with `report_to` logs this run, named by the architecture
    (a search's trial).
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
    base.update(max_steps=steps, ema=None, val_every=every or max(1, steps // 4), sample_every=0)  # no grids
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
    track = (tracking, arch.name) if tracking is not None else None
    result = train(model, cache, config, out=None, report=report, quiet=quiet, teacher=module, tracking=track)
    if record is not None and result.step_s is not None:
        record({"step_s": result.step_s, "teacher_s": result.teacher_s})
    return result.val_loss
