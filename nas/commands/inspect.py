"""Parameters, MACs (attention matmuls included) and optionally latency of an architecture file;
the size and cost range of a search-space file. The file kind is detected from its keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from nas import limits as L
from nas.errors import NasError
from nas.settings import CommandSettings, arg


class Settings(CommandSettings):
    command = ("inspect",)
    path: str = arg(help="architecture YAML (search_spaces/archs/*.yaml) or space YAML", positional=True)
    as_json: bool = arg(False, "print one JSON object instead of a table", flag="--json")
    latency: bool = arg(False, "also measure forward latency (builds real weights)")
    device: str = arg("cpu", "torch device for latency (cpu, cuda, cuda:1, mps)")
    # the same bounds as a space file's `latency:` section (nas/limits.py)
    batch: int = arg(1, "latents per forward", ge=1, le=L.MAX_LATENCY_BATCH)
    tokens: int | None = arg(None, "text tokens (default: the file's text_len)", ge=1, le=L.MAX_TEXT_LEN)
    dtype: Literal["fp32", "fp16", "bf16"] = arg("fp32", "weights and activations type for latency")
    warmup: int = arg(3, "untimed forwards before timing", ge=0, le=L.MAX_LATENCY_WARMUP)
    iters: int = arg(10, "timed forwards", ge=1, le=L.MAX_LATENCY_ITERS)
    channels_last: bool = arg(False, "channels_last memory format")
    compile: bool = arg(False, "torch.compile the model before timing")


SETTINGS = Settings


def _fmt(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise NasError(f"--device {device}: CUDA is not available on this machine (allowed: cpu)")


def inspect_arch(args, data_path: Path) -> dict:
    from nas.cost import arch_cost, measure_latency
    from nas.space import build_unet, load_arch

    arch = load_arch(data_path)
    report = {"file": str(data_path), "name": arch.name, **arch_cost(arch, args.batch, args.tokens)}
    if args.latency:
        lat = measure_latency(
            build_unet(arch),
            arch,
            device=args.device,
            batch=args.batch,
            dtype=args.dtype,
            warmup=args.warmup,
            iters=args.iters,
            tokens=args.tokens,
            channels_last=args.channels_last,
            compile=args.compile,
        )
        report.update(lat.as_dict())
    report["levels"] = [lv.model_dump(exclude_none=True) for lv in arch.levels]
    report["mid"] = arch.mid.model_dump() if arch.mid else None
    return report


def inspect_space(args, path: Path) -> dict:
    from nas.cost import arch_cost
    from nas.space import extreme_archs, load_space, space_size

    space = load_space(path)
    rows: list[dict[str, Any]] = []
    for depth, small, large in extreme_archs(space):
        lo, hi = arch_cost(small, args.batch, args.tokens), arch_cost(large, args.batch, args.tokens)
        rows.append(
            {
                "depth": depth,
                "smallest": {
                    "params": lo["params"],
                    "macs": lo["macs"],
                    "arch": small.to_data(),
                },
                "largest": {
                    "params": hi["params"],
                    "macs": hi["macs"],
                    "arch": large.to_data(),
                },
            }
        )
    smallest = min(rows, key=lambda r: r["smallest"]["params"])["smallest"]
    largest = max(rows, key=lambda r: r["largest"]["params"])["largest"]
    return {
        "file": str(path),
        "name": space.name,
        "size": space_size(space),
        "depth": [space.depth.min, space.depth.max],
        "params_range": [smallest["params"], largest["params"]],
        "macs_range": [min(r["smallest"]["macs"] for r in rows), max(r["largest"]["macs"] for r in rows)],
        "per_depth": rows,
        "smallest": smallest,
        "largest": largest,
        "objectives": [o.model_dump() for o in space.objectives],
        "budgets": space.budgets.model_dump(exclude_none=True),
        "baselines": space.baselines,
    }


def run(args: Settings) -> int:
    from nas.config import read_yaml

    _check_device(args.device)
    path = Path(args.path)
    data = read_yaml(path)
    is_space = isinstance(data, dict) and "depth" in data
    report = inspect_space(args, path) if is_space else inspect_arch(args, path)
    if args.as_json:
        print(json.dumps(report, indent=2))
        return 0
    if is_space:
        print(
            f"space {report['name']} ({report['file']}): {report['size']:,} architectures, depth {report['depth'][0]}..{report['depth'][1]}"
        )
        print(f"  params {_fmt(report['params_range'][0])} .. {_fmt(report['params_range'][1])}")
        print(
            f"  MACs   {_fmt(report['macs_range'][0])} .. {_fmt(report['macs_range'][1])} (attention included)"
        )
        print(
            f"  {'depth':>5}  {'smallest params':>15}  {'smallest MACs':>13}  {'largest params':>14}  {'largest MACs':>12}"
        )
        for r in report["per_depth"]:
            s, big = r["smallest"], r["largest"]
            print(
                f"  {r['depth']:>5}  {_fmt(s['params']):>15}  {_fmt(s['macs']):>13}  {_fmt(big['params']):>14}  {_fmt(big['macs']):>12}"
            )
        return 0
    r = report
    print(f"arch {r['name']} ({r['file']}): {r['model_class']}")
    print(f"  params          {r['params']:,} ({_fmt(r['params'])})")
    print(
        f"  MACs            {r['macs']:,} ({_fmt(r['macs'])}) per forward, batch {r['batch']}, "
        f"{r['latent_size']}x{r['latent_size']} latent, {r['tokens']} tokens"
    )
    print(f"  attention MACs  {r['attention_macs']:,} ({100 * r['attention_share']:.1f}% of total)")
    if args.latency:
        print(
            f"  latency         p50 {r['latency_ms_p50']:.2f} ms, p90 {r['latency_ms_p90']:.2f} ms "
            f"({r['device']}, {r['dtype']}, {r['iters']} iters)"
        )
        print(f"  peak memory     {r['peak_memory_mb']:.0f} MB")
    print(f"  {'level':>5}  {'channels':>8}  {'resnets':>7}  {'attn':>4}  {'up attn':>7}")
    for i, lv in enumerate(r["levels"]):
        print(
            f"  {i:>5}  {lv['channels']:>8}  {lv['resnets']:>7}  {lv['attentions']:>4}  {lv['up_attentions']:>7}"
        )
    mid = r["mid"]
    print(
        "  mid: " + (f"{mid['resnets']} ResNets, {mid['attentions']} transformer layers" if mid else "none")
    )
    return 0
