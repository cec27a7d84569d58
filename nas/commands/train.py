"""Train a U-Net on a latent cache with a training recipe (a preset name or a YAML file).

Presets: decidiffusion (default recipe: cosine, zero terminal SNR, v-prediction, Min-SNR gamma=5,
EMA for the last 5%), sd15 (SD 1.5's recipe), tiny (a CPU-sized run). The run folder gets the
resolved config, the architecture, env.json, metrics.csv, loss.png, checkpoints/ and final/.
Several GPUs: `accelerate launch --multi_gpu --num_processes N -m nas train ...` or
`torchrun --nproc_per_node N -m nas train ...` (same code path; on CPUs a gloo group).
"""

from __future__ import annotations

from nas.core.settings import CommandSettings, arg

MAX_STEPS = 10_000_000  # optimizer steps; more is a typo (SD 1.5 trained ~1.4M)


class Settings(CommandSettings):
    command = ("train",)
    config: str = arg(
        help="training config YAML, or a preset name: decidiffusion, sd15, tiny",
        positional=True,
        input="train_config",
    )
    arch: str | None = arg(None, "architecture YAML (default: the config's arch:)", input="arch")
    cache: str | None = arg(
        None, "latent cache folder from `nas precompute` (default: the config's cache:)", input="folder"
    )
    out: str | None = arg(None, "run folder (default: results/train/<arch name>-<config name>)")
    max_steps: int | None = arg(None, "optimizer steps (overrides max_steps)", ge=1, le=MAX_STEPS)
    resume: bool = arg(False, "continue from the run folder's latest checkpoint")
    overrides: list[str] = arg(
        [], "override config keys, values in YAML syntax: lr=2e-4 ema.start=0.9 ema=null", flag="--set"
    )
    quiet: bool = arg(False, "no progress bar")


SETTINGS = Settings


def resolve(settings: Settings):
    """The training config: preset or file, then --set, then --max-steps (NasError naming the key)."""
    from nas.train.config import load_config

    return load_config(settings.config, settings.overrides, max_steps=settings.max_steps)


def dry_run(settings: Settings) -> dict:
    return {"resolved_config": resolve(settings).model_dump(mode="json")}


def run(settings: Settings) -> int:
    from nas.core.lock import exclusive

    # One writer per run folder (docs/reliability.md); in a multi-process run, global rank 0's.
    with exclusive(_run_folder(settings), distributed=True):
        return _run(settings)


def _run_folder(settings: Settings) -> str | None:
    """--out, else the folder train_arch defaults to (results/train/<arch name>-<config name>);
    None without an architecture (train_arch says so)."""
    if settings.out is not None:
        return settings.out
    from nas.space import load_arch

    config = resolve(settings)
    arch = settings.arch or config.arch
    return None if arch is None else f"results/train/{load_arch(arch).name}-{config.name}"


def _run(settings: Settings) -> int:
    from nas.core.lock import is_primary_rank
    from nas.sample.training_grid import TrainingGrid
    from nas.train.interrupt import TrainingInterrupted
    from nas.train.loop import train_arch

    config = resolve(settings)
    main = is_primary_rank()  # in a multi-process run only global rank 0 prints (and errors)
    try:
        result = train_arch(
            config, settings.arch, settings.cache, out=settings.out, resume=settings.resume,
            quiet=settings.quiet or not main, sampler=TrainingGrid,  # sample_every's grids
        )  # fmt: skip
    except TrainingInterrupted as exc:  # the CLI prints its line once, from rank 0
        if main:
            raise
        return exc.exit_code
    if result.run_dir is not None and main and config.lora is not None:
        from nas.sample.card import write_lora_card

        write_lora_card(result.run_dir)  # the adapter folder's Hub model card (README.md)
    if result.run_dir is not None and main and config.controlnet is not None:
        from nas.sample.card import write_controlnet_card

        write_controlnet_card(result.run_dir)  # RUN/controlnet/README.md (Hub model card)
    if result.run_dir is not None and main:
        ema = f", EMA {result.val_loss_ema:.5f}" if result.val_loss_ema is not None else ""
        print(
            f"trained {result.step} steps: validation loss {result.val_loss:.5f}{ema}; run folder {result.run_dir}"
        )
    return 0
