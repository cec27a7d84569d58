"""Time every distinct block of a search space on one device into a latency lookup table (JSON),
and fit its correction on a few whole networks; `latency: {source: table, table: PATH}` in a space
then predicts each trial's latency from it. An interrupted run resumes from TABLE.json.partial."""

from __future__ import annotations

import argparse
from pathlib import Path

from nas.errors import NasError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", type=Path, help="search-space YAML whose blocks to time")
    p.add_argument("--out", type=Path, required=True, help="table JSON to write (e.g. tables/a10g.json)")
    p.add_argument("--device", default=None, help="torch device (default: the space's latency.device)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: the space's")
    p.add_argument("--batch", type=int, default=None, help="latents per call (default: the space's)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (slow to build)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per block (default 3)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds; median kept (default 7)")
    p.add_argument(
        "--fit", type=int, default=6, help="whole networks the correction is fitted on (default 6)"
    )
    p.add_argument("--fit-iters", type=int, default=10, help="timed forwards per whole network (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fit networks")


def run(args) -> int:
    from nas import limits as L
    from nas.latency_build import build_table
    from nas.latency_table import TableSetup, summary
    from nas.space import load_space

    space = load_space(args.space)
    ranges = {
        "batch": (1, L.MAX_LATENCY_BATCH),
        "warmup": (0, L.MAX_LATENCY_WARMUP),
        "rounds": (1, L.MAX_LATENCY_ITERS),
        "fit": (0, L.MAX_LATENCY_ITERS),
        "fit_iters": (1, L.MAX_LATENCY_ITERS),
    }
    for name, (low, high) in ranges.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise NasError(f"--{name.replace('_', '-')} must be in {low}..{high}, got {value}")
    device = args.device or space.latency.device
    try:
        import torch

        kind = torch.device(device).type
    except RuntimeError:
        raise NasError(f"--device {device}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise NasError(f"--device {device}: CUDA is not available on this machine")
    setup = TableSetup(
        dtype=args.dtype or space.latency.dtype,
        batch=args.batch or space.latency.batch,
        channels_last=args.channels_last,
        compile=args.compile,
        warmup=args.warmup,
        rounds=args.rounds,
    )
    table = build_table(space, args.out, device, setup, args.fit, args.fit_iters, args.seed)
    print(f"wrote {args.out}: {summary(table)}, built in {table.build_seconds:.0f} s")
    return 0
