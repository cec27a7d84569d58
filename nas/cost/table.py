"""Per-device latency lookup tables: time every distinct block of a space once on a device, then
predict an architecture's latency as the sum of its blocks times a correction fitted on a few whole
networks measured on the same device (what isolated timing misses: cache misses between blocks,
Python dispatch, skip bookkeeping). FBNet (Wu et al. 2019) and SnapFusion (Li et al. 2023)
sum per-block latencies measured once on the target; nn-Meter (Zhang et al. 2021) and HELP
(Lee et al. 2021) show such predictors rank architectures per device far better than FLOPs do.

A prediction needs no forward pass and no model build, is deterministic and immune to load on the
machine that searches; the table is measured once on the target (an A10G, a phone) and shipped.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from nas.core.config import Strict, validate
from nas.core.errors import NasError
from nas.core.runfolder import environment, read_json, write_json
from nas.cost.blocks import Block, arch_blocks, block_module, describe, parse_key, space_blocks
from nas.cost.measure import BUSY_CORES_WARN, DTYPES, LoadWarning, OtherLoad, measure_latency
from nas.space.schema import Arch, Settings, Space

FORMAT = "nas-latency-table/1"
# One timed sample runs a block this long at least (ms): a block at 8x8 latents takes tens of
# microseconds, where one call's timer and dispatch jitter would dominate.
MIN_SAMPLE_MS = 2.0
MAX_CALLS = 200  # calls per sample at most (the smallest blocks)


class DeviceInfo(Strict):
    device: str  # torch device type the blocks ran on: cpu, cuda, mps
    name: str  # GPU name (torch.cuda.get_device_name) or CPU model
    cpu_cores: int | None = None
    threads: int  # torch intra-op threads while timing (OMP_NUM_THREADS)
    torch: str
    diffusers: str | None = None


class TableSetup(Strict):
    dtype: Literal["fp32", "fp16", "bf16"]
    batch: int = Field(ge=1)
    channels_last: bool = False
    compile: bool = False
    warmup: int = Field(ge=0)  # untimed calls per block before its first round
    rounds: int = Field(ge=1)  # interleaved rounds; a block's figure is the median over them


class BlockTime(Strict):
    ms: float = Field(ge=0)  # median per-call latency over the rounds
    rounds_ms: list[float]
    calls: int = Field(ge=1)  # calls averaged in one sample


class FitPoint(Strict):
    arch: str
    blocks_ms: float  # sum of the architecture's block figures
    measured_ms: float  # whole network, median forward (nas.cost.measure.measure_latency)
    measured_p90_ms: float
    predicted_ms: float = 0.0
    error_pct: float = 0.0  # (predicted - measured) / measured x 100
    other_cores_busy: float = 0.0


class Fit(Strict):
    """measured = slope x blocks_ms + intercept_ms, fitted on `points` as `model` says (CORRECTIONS)."""

    model: Literal["ratio", "line"] = "line"  # tables made before `model` existed hold a line
    slope: float = 1.0
    intercept_ms: float = 0.0
    p90_ratio: float = 1.0  # median measured p90 / p50 of the points (predicted p90 = ratio x p50)
    points: list[FitPoint] = []
    mean_abs_error_pct: float = 0.0  # on the points the fit was made on (optimistic)
    # mean |error| of each point predicted by the fit made without it (None: under 3 points);
    # the honest estimate of the correction's error on networks it never saw
    loo_abs_error_pct: float | None = None


class LatencyTable(Strict):
    format: Literal["nas-latency-table/1"] = "nas-latency-table/1"  # = FORMAT
    space: str  # name of the space it was built for (any space whose blocks it covers may use it)
    settings: Settings
    device: DeviceInfo
    setup: TableSetup
    blocks: dict[str, BlockTime]
    fit: Fit
    other_cores_busy: float = 0.0  # most CPU cores other processes kept busy in any round
    build_seconds: float = 0.0
    created: str = ""
    fit_seed: int = (
        0  # seed of the random fit networks (nas.cost.table_build.fit_archs), to measure them again
    )
    # when `nas latency-table --recalibrate` last re-measured the fit networks and refitted the
    # correction (blocks kept): "" for never
    recalibrated: str = ""


# ---- timing --------------------------------------------------------------------------------------


def _sample_ms(run: Callable, inputs: tuple, calls: int, cuda: bool, dev) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            run(*inputs)
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        run(*inputs)
    return (time.perf_counter() - t0) * 1000 / calls


def time_blocks(
    blocks: list[Block],
    setup: TableSetup,
    device: str,
    done: dict[str, list[float]],
    save: Callable[[dict[str, list[float]], dict[str, int], float], None],
    log: Callable[[str], None] = print,
    after_round: Callable[[int], None] | None = None,
) -> tuple[dict[str, int], float]:
    """Time each block: warm-up, then `rounds` interleaved rounds (every block once per round, so
    load that comes and goes hits all blocks alike). `done` holds rounds of an interrupted run and
    grows in place; `save` is called after every round, then `after_round(index)` (the table build
    measures its whole networks there, under the same machine state). Returns (calls per sample,
    most busy cores)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    runs = []
    with torch.inference_mode():
        for b in blocks:
            module, inputs = block_module(b, setup.batch, dev, DTYPES[setup.dtype])
            if setup.channels_last:
                module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
                inputs = tuple(
                    x.contiguous(memory_format=torch.channels_last) if x is not None and x.dim() == 4 else x
                    for x in inputs
                )
            run = torch.compile(module) if setup.compile else module
            for _ in range(setup.warmup):
                run(*inputs)
            single = _sample_ms(run, inputs, 1, cuda, dev)
            calls = max(1, min(MAX_CALLS, math.ceil(MIN_SAMPLE_MS / max(single, 1e-3))))
            runs.append((b.key, run, inputs, calls))
        busiest = 0.0
        first = min((len(done.get(k, [])) for k, *_ in runs), default=0)
        for r in range(first, setup.rounds):
            started = time.perf_counter()
            with OtherLoad() as load:
                for key, run, inputs, calls in runs:
                    done.setdefault(key, [])
                    if len(done[key]) <= r:
                        done[key].append(_sample_ms(run, inputs, calls, cuda, dev))
            cores = 0.0 if cuda else load.cores
            busiest = max(busiest, cores)
            save(done, {k: c for k, _, _, c in runs}, busiest)
            log(
                f"  round {r + 1}/{setup.rounds}: {len(runs)} blocks in {time.perf_counter() - started:.1f} s"
                + (f", other processes busy on {cores:.1f} cores" if cores > BUSY_CORES_WARN else "")
            )
            if after_round is not None:
                with torch.inference_mode(False):  # whole networks are built and run as the search does
                    after_round(r)
    return {k: c for k, _, _, c in runs}, busiest


def blocks_ms(table: LatencyTable, arch: Arch) -> float:
    """Sum of the table's figures over the blocks of `arch` (NasError naming a missing block)."""
    total = 0.0
    for b in arch_blocks(arch):
        entry = table.blocks.get(b.key)
        if entry is None:
            raise NasError(f"latency table for {table.space} has no block {b.key} (architecture {arch.name})")
        total += entry.ms
    return total


def predict(table: LatencyTable, arch: Arch) -> dict[str, float]:
    """{'latency_ms_p50', 'latency_ms_p90', 'blocks_ms'} of `arch` from the table: no forward pass."""
    raw = blocks_ms(table, arch)
    p50 = max(table.fit.slope * raw + table.fit.intercept_ms, 0.0)
    return {"latency_ms_p50": p50, "latency_ms_p90": p50 * table.fit.p90_ratio, "blocks_ms": raw}


def _ratio(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """slope = median of measured / blocks over the points, no intercept."""
    ratios = [y / x for x, y in zip(xs, ys) if x > 0]
    return (statistics.median(ratios) if ratios else 1.0), 0.0


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line; slope 1 and no intercept for < 2 points or points that all sum alike."""
    if len(xs) < 2:
        return 1.0, 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 1.0, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


# How the block sum becomes a network's latency, fitted on the table's few whole networks.
# ratio (default): a network runs a constant factor slower than its blocks timed alone (alone, a
# block reruns with its weights and input hot in cache); the median of measured / blocks ignores one
# disturbed measurement of the K, which a least-squares line follows (results/latency_model/).
# line: least-squares slope and intercept, the model of tables made before `model` existed.
CORRECTIONS: dict[str, Callable[[list[float], list[float]], tuple[float, float]]] = {
    "ratio": _ratio,
    "line": _line,
}
DEFAULT_CORRECTION = "ratio"


def fit_correction(points: list[FitPoint], model: str = DEFAULT_CORRECTION) -> Fit:
    """Fit `model` (a key of CORRECTIONS) through (blocks_ms, measured_ms) of `points`, with each
    point's error and the leave-one-out error."""
    if model not in CORRECTIONS:
        raise NasError(f"latency correction {model!r} unknown (allowed: {', '.join(CORRECTIONS)})")
    fit = CORRECTIONS[model]
    xs, ys = [p.blocks_ms for p in points], [p.measured_ms for p in points]
    slope, intercept = fit(xs, ys)
    fitted = []
    for p in points:
        pred = slope * p.blocks_ms + intercept
        fitted.append(
            p.model_copy(
                update={"predicted_ms": pred, "error_pct": 100 * (pred - p.measured_ms) / p.measured_ms}
            )
        )
    loo = None
    if len(points) >= 3:
        errors = []
        for i, p in enumerate(points):
            s, c = fit(xs[:i] + xs[i + 1 :], ys[:i] + ys[i + 1 :])
            errors.append(abs(100 * (s * p.blocks_ms + c - p.measured_ms) / p.measured_ms))
        loo = statistics.fmean(errors)
    ratio = statistics.median(p.measured_p90_ms / p.measured_ms for p in points) if points else 1.0
    mape = statistics.fmean(abs(p.error_pct) for p in fitted) if fitted else 0.0
    return Fit(
        model=model,
        slope=slope,
        intercept_ms=intercept,
        p90_ratio=ratio,
        points=fitted,
        mean_abs_error_pct=mape,
        loo_abs_error_pct=loo,
    )


def refit(table: LatencyTable, model: str = DEFAULT_CORRECTION) -> LatencyTable:
    """The table with its correction fitted again on its stored networks (no timing)."""
    return table.model_copy(update={"fit": fit_correction(table.fit.points, model)})


def measure_whole(
    arch: Arch, setup: TableSetup, device: str, iters: int, model: torch.nn.Module | None = None
) -> FitPoint:
    """Whole-network latency as the search's `source: measure` takes it (`model`: `arch` built
    already, reused over passes)."""
    from nas.space import build_unet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoadWarning)  # recorded in the point instead
        lat = measure_latency(
            build_unet(arch) if model is None else model,
            arch,
            device=device,
            batch=setup.batch,
            dtype=setup.dtype,
            warmup=max(setup.warmup, 1),
            iters=iters,
            channels_last=setup.channels_last,
            compile=setup.compile,
        )
    return FitPoint(
        arch=arch.name,
        blocks_ms=0.0,
        measured_ms=lat.latency_ms_p50,
        measured_p90_ms=lat.latency_ms_p90,
        other_cores_busy=lat.other_cores_busy,
    )


# ---- files ---------------------------------------------------------------------------------------


def load_table(path: str | Path) -> LatencyTable:
    """Read and validate a table file: a missing, corrupt or foreign file is a one-line NasError."""
    path = Path(path)
    if not path.is_file():
        raise NasError(
            f"{path}: latency table not found (make one with `nas latency-table SPACE --out {path}`)"
        )
    try:
        data = read_json(path)
    except ValueError as exc:
        raise NasError(f"{path}: not a JSON latency table ({exc})") from None
    if isinstance(data, dict) and data.get("format") != FORMAT:
        raise NasError(
            f"{path}: format is {data.get('format')!r}, expected {FORMAT!r} (a `nas latency-table` file)"
        )
    table = validate(LatencyTable, data, path)
    for key in table.blocks:
        try:
            parse_key(key)
        except ValueError as exc:
            raise NasError(f"{path}: blocks: bad key {key!r}: {exc}") from None
    return table


def device_type(device: str) -> str:
    return torch.device(device).type


def check_table(table: LatencyTable, space: Space, source: str | Path) -> None:
    """NasError unless the table was measured as `space.latency` asks and covers every block of the
    space; a LoadWarning if it was measured under co-tenant load."""
    lat = space.latency
    asked = {"device": device_type(lat.device), "dtype": lat.dtype, "batch": lat.batch}
    has = {"device": table.device.device, "dtype": table.setup.dtype, "batch": table.setup.batch}
    for field, want in asked.items():
        if has[field] != want:
            raise NasError(
                f"{source}: measured with {field}={has[field]}, but space {space.name} asks latency.{field}={want};"
                f" rebuild it with `nas latency-table ... --{field} {want}` or change the space"
            )
    if lat.device_name and lat.device_name.lower() not in table.device.name.lower():
        raise NasError(
            f"{source}: measured on {table.device.name!r}, but space {space.name} asks"
            f" latency.device_name={lat.device_name!r}"
        )
    missing = sorted(b.key for b in space_blocks(space) if b.key not in table.blocks)
    if missing:
        raise NasError(
            f"{source}: lacks {len(missing)} block(s) of space {space.name}, e.g. {missing[0]};"
            " rebuild it with `nas latency-table` on this space"
        )
    if table.other_cores_busy > BUSY_CORES_WARN:
        warnings.warn(
            f"{source}: measured while other processes kept {table.other_cores_busy:.1f} CPU cores busy;"
            " its figures likely read high, rebuild it on a quiet machine",
            LoadWarning,
            stacklevel=2,
        )


def resolve_table_path(space: Space, space_path: str | Path | None) -> Path:
    """`latency.table` relative to the space file (as `baselines:` are)."""
    table = Path(space.latency.table or "")
    if not table.is_absolute() and space_path is not None:
        table = Path(space_path).parent / table
    return table


def prepare_latency(space: Space, space_path: str | Path | None) -> Space:
    """Before any trial: for `latency: {source: table}`, the space with its table path resolved,
    the table loaded and checked (NasError otherwise); other spaces unchanged."""
    if space.latency.source != "table":
        return space
    path = resolve_table_path(space, space_path)
    check_table(cached_table(str(path)), space, path)
    return space.model_copy(
        update={"latency": space.latency.model_copy(update={"table": str(path.resolve())})}
    )


_TABLES: dict[str, LatencyTable] = {}  # one load per process: every trial reads the same table


def cached_table(path: str) -> LatencyTable:
    if path not in _TABLES:
        _TABLES[path] = load_table(path)
    return _TABLES[path]


def table_cost(space: Space, arch: Arch) -> dict[str, Any]:
    """The latency figures of `arch` from the space's table, for `measure_cost`."""
    table = cached_table(str(resolve_table_path(space, None)))
    out: dict[str, Any] = dict(predict(table, arch))
    out.update(
        latency_source="table",
        latency_device=table.device.name,
        latency_table=str(space.latency.table),
        other_cores_busy=table.other_cores_busy,
    )
    return out


def device_info(device: str) -> DeviceInfo:
    env = environment(device=device)
    return DeviceInfo(
        device=device_type(device),
        name=env.get("device_name") or env["cpu"],
        cpu_cores=env["cpu_cores"],
        threads=torch.get_num_threads(),
        torch=env["torch"],
        diffusers=env["diffusers"],
    )


def summary(table: LatencyTable) -> str:
    kinds = describe(parse_key(k) for k in table.blocks)
    loo_pct = table.fit.loo_abs_error_pct
    loo = "" if loo_pct is None else f", {loo_pct:.1f}% on each left out"
    return (
        f"{len(table.blocks)} blocks ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}) on"
        f" {table.device.name}, {table.setup.dtype}, batch {table.setup.batch}; correction"
        f" {table.fit.slope:.3f} x blocks + {table.fit.intercept_ms:.3f} ms over {len(table.fit.points)}"
        f" networks ({table.fit.model}; mean |error| {table.fit.mean_abs_error_pct:.1f}%{loo})"
    )


def write_table(path: str | Path, table: LatencyTable) -> None:
    write_json(path, table.model_dump(mode="json"))
