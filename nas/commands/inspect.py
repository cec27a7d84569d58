"""Parameters, MACs (attention matmuls included) and optionally latency of an architecture file;
the size and cost range of a search-space file. The file kind is detected from its keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from nas.core import limits as L
from nas.core.errors import NasError
from nas.core.settings import CommandSettings, arg
from nas.deploy.choices import Precision, Runtime


class Settings(CommandSettings):
    command = ("inspect",)
    path: str = arg(help="architecture YAML (search_spaces/archs/*.yaml) or space YAML", positional=True)
    as_json: bool = arg(False, "print one JSON object instead of a table", flag="--json")
    latency: bool = arg(False, "also measure forward latency (builds real weights)")
    device: str = arg("cpu", "torch device for latency (cpu, cuda, cuda:1, mps)")
    # the same bounds as a space file's `latency:` section (nas/core/limits.py)
    batch: int | None = arg(
        None, "latents per forward (default 1, or the table's)", ge=1, le=L.MAX_LATENCY_BATCH
    )
    tokens: int | None = arg(None, "text tokens (default: the file's text_len)", ge=1, le=L.MAX_TEXT_LEN)
    dtype: Literal["fp32", "fp16", "bf16"] | None = arg(
        None, "weights and activations type (default fp32, or the table's)"
    )
    warmup: int = arg(3, "untimed forwards before timing", ge=0, le=L.MAX_LATENCY_WARMUP)
    iters: int = arg(10, "timed forwards", ge=1, le=L.MAX_LATENCY_ITERS)
    channels_last: bool = arg(False, "channels_last memory format")
    compile: bool = arg(False, "torch.compile the model before timing")
    runtime: Runtime | None = arg(
        None,
        "time the U-Net behind this runtime (eager, compile, cudagraphs, onnxruntime, openvino); with --precision",
    )
    precision: Precision | None = arg(
        None, "the runtime's precision (default fp32; README, deploy-time runtimes)"
    )
    latency_table: str | None = arg(
        None, "also print the latency predicted from this `nas latency-table` file", input="file"
    )


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


def _table_setup(args):
    """Load --latency-table; --batch and --dtype default to the table's and must match it."""
    if args.latency_table is None:
        args.batch, args.dtype = args.batch or 1, args.dtype or "fp32"
        return None
    from nas.cost.table import load_table

    table = load_table(args.latency_table)
    args.batch, args.dtype = args.batch or table.setup.batch, args.dtype or table.setup.dtype
    for name, want in (("batch", table.setup.batch), ("dtype", table.setup.dtype)):
        if getattr(args, name) != want:
            raise NasError(
                f"--{name} {getattr(args, name)} differs from {args.latency_table}'s {name} {want}"
            )
    if args.latency and args.device.split(":")[0] != table.device.device:
        raise NasError(
            f"--device {args.device} differs from {args.latency_table}'s device {table.device.device}"
        )
    return table


def inspect_arch(args, data_path: Path) -> dict:
    from nas.cost.measure import arch_cost, measure_latency
    from nas.space import build_unet, load_arch

    arch = load_arch(data_path)
    table = _table_setup(args)
    report = {"file": str(data_path), "name": arch.name, **arch_cost(arch, args.batch, args.tokens)}
    if args.latency:
        runtime = args.runtime or ("eager" if args.precision else None)
        if runtime:
            from nas.deploy.runtimes import check_runtime

            check_runtime(runtime, args.precision or "fp32", args.device)
            if args.dtype != "fp32" or args.channels_last or args.compile:
                raise NasError("--runtime/--precision: give the precision there instead of --dtype, "
                               "--channels-last or --compile (allowed with them: --dtype fp32)")  # fmt: skip
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
            runtime=runtime,
            precision=args.precision or "fp32",
        )
        report.update(lat.as_dict())
    if table is not None:
        from nas.cost.table import predict

        predicted = predict(table, arch)
        report["predicted_latency_ms_p50"] = predicted["latency_ms_p50"]
        report["latency_table_device"] = table.device.name
    report["levels"] = [lv.model_dump(exclude_none=True) for lv in arch.levels]
    report["mid"] = arch.mid.model_dump() if arch.mid else None
    report["attention_layout"] = arch.attention_layout
    return report


def inspect_space(args, path: Path) -> dict:
    from nas.cost.measure import arch_cost
    from nas.space import extreme_archs, load_space, space_size

    space = load_space(path)
    rows: list[dict[str, Any]] = []
    for depth, small, large in extreme_archs(space):
        batch = args.batch or 1
        lo, hi = arch_cost(small, batch, args.tokens), arch_cost(large, batch, args.tokens)
        rows.append(
            {
                "depth": depth,
                "mid_resolution": large.mid.resolution if large.mid is not None else "same",
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
    from nas.core.config import read_yaml

    _check_device(args.device)
    if (args.runtime or args.precision) and not args.latency:
        raise NasError("--runtime and --precision apply to the latency: add --latency")
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
        # a row per depth, and per mid-block resolution where the space has both
        both = len({r["mid_resolution"] for r in report["per_depth"]}) > 1
        mid_head = f"  {'mid':>4}" if both else ""
        print(
            f"  {'depth':>5}{mid_head}  {'smallest params':>15}  {'smallest MACs':>13}  {'largest params':>14}  {'largest MACs':>12}"
        )
        for r in report["per_depth"]:
            s, big = r["smallest"], r["largest"]
            mid_col = f"  {r['mid_resolution']:>4}" if both else ""
            print(
                f"  {r['depth']:>5}{mid_col}  {_fmt(s['params']):>15}  {_fmt(s['macs']):>13}  {_fmt(big['params']):>14}  {_fmt(big['macs']):>12}"
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
            f"({r['device']}, {r['dtype'] if r['precision'] is None else r['runtime'] + ' ' + r['precision']}, "
            f"{r['iters']} iters)"
        )
        print(f"  peak memory     {r['peak_memory_mb']:.0f} MB")
    if "predicted_latency_ms_p50" in r:
        measured = r.get("latency_ms_p50")
        versus = (
            f", measured {measured:.2f} ms ({100 * (r['predicted_latency_ms_p50'] / measured - 1):+.1f}%)"
            if measured
            else ""
        )
        print(
            f"  predicted       p50 {r['predicted_latency_ms_p50']:.2f} ms (table on {r['latency_table_device']}){versus}"
        )
    print(f"  {'level':>5}  {'channels':>8}  {'resnets':>7}  {'attn':>4}  {'up attn':>7}")
    for i, lv in enumerate(r["levels"]):
        print(
            f"  {i:>5}  {lv['channels']:>8}  {lv['resnets']:>7}  {lv['attentions']:>4}  {lv['up_attentions']:>7}"
        )
    mid = r["mid"]
    where = " at half the lowest level's resolution" if mid and mid["resolution"] == "half" else ""
    print(
        "  mid: "
        + (f"{mid['resnets']} ResNets, {mid['attentions']} transformer layers{where}" if mid else "none")
    )
    print(f"  attention layout: {r['attention_layout']}")
    return 0
