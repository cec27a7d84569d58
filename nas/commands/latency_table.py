"""Time every distinct block of a search space on one device into a latency lookup table (JSON),
and fit its correction on a few whole networks; `latency: {source: table, table: PATH}` in a space
then predicts each trial's latency from it. An interrupted run resumes from TABLE.json.partial.
`--recalibrate` measures an existing table's fit networks again and refits its correction (seconds,
not a build): for a shared host whose speed drifts, run it before a search."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from nas.core import limits as L
from nas.core.errors import NasError
from nas.core.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("latency-table",)
    space: str = arg(help="search-space YAML whose blocks to time", positional=True, input="file")
    out: str = arg(help="table JSON to write (e.g. tables/a10g.json)")
    device: str | None = arg(None, "torch device (default: the space's latency.device)")
    dtype: Literal["fp32", "fp16", "bf16"] | None = arg(None, "default: the space's latency.dtype")
    batch: int | None = arg(None, "latents per call (default: the space's)", ge=1, le=L.MAX_LATENCY_BATCH)
    channels_last: bool = arg(False, "channels_last memory format")
    compile: bool = arg(False, "torch.compile every block (slow to build)")
    warmup: int = arg(3, "untimed calls per block", ge=0, le=L.MAX_LATENCY_WARMUP)
    rounds: int = arg(7, "interleaved timing rounds; the median is kept", ge=1, le=L.MAX_LATENCY_ITERS)
    fit: int = arg(6, "whole networks the correction is fitted on", ge=0, le=L.MAX_LATENCY_ITERS)
    fit_iters: int = arg(10, "timed forwards per whole network", ge=1, le=L.MAX_LATENCY_ITERS)
    seed: int = arg(0, "seed of the random fit networks", ge=0, le=L.MAX_SEED)
    recalibrate: bool = arg(
        False,
        "re-measure the fit networks of the existing table --out now (--rounds passes) and refit its"
        " correction; blocks kept",
    )
    correction: Literal["ratio", "line"] = arg(
        "ratio",
        "how block sums map to whole networks: ratio (median measured/blocks) or line (least squares)",
    )


SETTINGS = Settings


def run(args: Settings) -> int:
    from nas.core.lock import exclusive

    with exclusive(args.out):  # one writer per table (and its .partial; docs/reliability.md)
        return _run(args)


def _run(args: Settings) -> int:
    from nas.cost.table import TableSetup, summary
    from nas.cost.table_build import build_table, recalibrate
    from nas.space import load_space

    space = load_space(args.space)
    device = args.device or space.latency.device
    try:
        import torch

        kind = torch.device(device).type
    except RuntimeError:
        raise NasError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise NasError(f"--device {device}: CUDA is not available on this machine")
    if args.recalibrate:
        table = recalibrate(space, Path(args.out), device, args.rounds, args.fit_iters)
        print(f"recalibrated {args.out}: {summary(table)}")
        return 0
    setup = TableSetup(
        dtype=args.dtype or space.latency.dtype,
        batch=args.batch or space.latency.batch,
        channels_last=args.channels_last,
        compile=args.compile,
        warmup=args.warmup,
        rounds=args.rounds,
    )
    table = build_table(
        space, Path(args.out), device, setup, args.fit, args.fit_iters, args.seed, correction=args.correction
    )
    print(f"wrote {args.out}: {summary(table)}, built in {table.build_seconds:.0f} s")
    return 0
