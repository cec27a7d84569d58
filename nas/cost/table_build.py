"""Build a latency table: time every block of a space on a device and fit the correction on a few
whole networks, measured in the same rounds: after each round over the blocks, one pass over the
networks, so a machine whose speed drifts during the build moves both sides of the correction
alike. Resumable: the rounds done and the networks measured so far are kept in TABLE.json.partial (atomic writes) and picked up by a rerun with the same setup; the table itself
is written once, complete."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.core.runfolder import read_json, write_json
from nas.cost.blocks import describe, space_blocks
from nas.cost.table import (
    BUSY_CORES_WARN,
    DEFAULT_CORRECTION,
    BlockTime,
    FitPoint,
    LatencyTable,
    TableSetup,
    blocks_ms,
    device_info,
    fit_correction,
    load_table,
    measure_whole,
    time_blocks,
    write_table,
)
from nas.space import RandomChoices, build_unet, extreme_archs, sample_arch
from nas.space.schema import Arch, Space


def fit_archs(space: Space, count: int, seed: int = 0) -> list[Arch]:
    """The networks the correction is fitted on: the smallest and largest point of every depth
    (so the fit spans the space's latency range), then random points up to `count`."""
    archs: list[Arch] = []
    for _, smallest, largest in extreme_archs(space):
        archs += [smallest, largest]
    rng = RandomChoices(seed)
    while len(archs) < count:
        archs.append(sample_arch(space, rng, name=f"{space.name}-fit{len(archs)}"))
    return archs[: max(count, 0)]


def median_point(table: LatencyTable, arch: Arch, measured: list[FitPoint]) -> FitPoint:
    """One fit network's point: its block sum in `table` and the medians of its measured passes."""
    return FitPoint(
        arch=arch.name,
        blocks_ms=blocks_ms(table, arch),
        measured_ms=statistics.median(m.measured_ms for m in measured),
        measured_p90_ms=statistics.median(m.measured_p90_ms for m in measured),
        other_cores_busy=max(m.other_cores_busy for m in measured),
    )


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def build_table(
    space: Space,
    out: str | Path,
    device: str,
    setup: TableSetup,
    fit_count: int = 6,
    fit_iters: int = 10,
    seed: int = 0,
    log: Callable[[str], None] = print,
    correction: str = DEFAULT_CORRECTION,
    after_round: Callable[[int], None] | None = None,
) -> LatencyTable:
    """Measure the table of `space` on `device` and write it to `out` (atomically, once);
    `correction` is a key of nas.cost.table.CORRECTIONS. `after_round(index)` runs after each
    round's blocks and fit networks (experiments/studies/latency_model.py measures its validation networks
    there, under the same machine state)."""
    fit_correction([], correction)  # an unknown name fails before any timing
    started = time.perf_counter()
    blocks = sorted(space_blocks(space), key=lambda b: b.key)
    info = device_info(device)
    header: dict[str, Any] = {
        "space": space.name,
        "settings": space.settings.model_dump(mode="json"),
        "device": info.model_dump(mode="json"),
        "setup": setup.model_dump(mode="json"),
        "blocks": [b.key for b in blocks],
        "fit_count": fit_count,
        "seed": seed,
    }
    part = partial_path(out)
    state = read_json(part, default=None) if part.is_file() else None
    if isinstance(state, dict) and state.get("header") == header:
        log(
            f"resuming {part}: {min(map(len, state['rounds'].values()), default=0)} rounds, {sum(map(len, state['fit']))} whole-network measurements done"
        )
    else:
        if state is not None:
            log(f"{part}: made with another setup; starting over")
        state = {"header": header, "rounds": {}, "calls": {}, "busy": 0.0, "fit": [], "seconds": 0.0}
    elapsed0 = float(state.get("seconds", 0.0))

    def save(rounds=None, calls=None, busy=None) -> None:
        if rounds is not None:
            state.update(rounds=rounds, calls=calls, busy=max(state["busy"], busy))
        state["seconds"] = elapsed0 + time.perf_counter() - started
        write_json(part, state)

    kinds = ", ".join(f"{n} {k}" for k, n in sorted(describe(blocks).items()))
    log(f"timing {len(blocks)} blocks of {space.name} ({kinds}) on {info.name}, {info.threads} threads")
    archs = fit_archs(space, fit_count, seed)
    runs: list[list[dict]] = state["fit"]  # per round, per network: a measured FitPoint
    models: dict[str, Any] = {}

    def fit_pass(r: int) -> None:
        """Round r's pass over the fit networks (the part an interrupted run has not done)."""
        while len(runs) <= r:
            runs.append([])
        pass_started = time.perf_counter()
        for arch in archs[len(runs[r]) :]:
            if arch.name not in models:
                models[arch.name] = build_unet(arch, device=device)
            point = measure_whole(arch, setup, device, fit_iters, model=models[arch.name])
            runs[r].append(point.model_dump(mode="json"))
            state["busy"] = max(state["busy"], point.other_cores_busy)
            save()
            if len(runs[r]) == len(archs):
                log(f"  round {r + 1}/{setup.rounds}: {len(archs)} whole networks in"
                    f" {time.perf_counter() - pass_started:.1f} s")  # fmt: skip

    def each_round(r: int) -> None:
        fit_pass(r)
        if after_round is not None:
            after_round(r)

    calls, busy = time_blocks(blocks, setup, device, state["rounds"], save, log, each_round)
    for r in range(setup.rounds):  # the passes a run interrupted between blocks and networks lacks
        fit_pass(r)
    state["calls"].update(calls)
    times = {
        k: BlockTime(ms=statistics.median(v), rounds_ms=v, calls=state["calls"].get(k, 1))
        for k, v in state["rounds"].items()
        if k in header["blocks"]
    }
    table = LatencyTable(
        space=space.name,
        settings=space.settings,
        device=info,
        setup=setup,
        blocks=times,
        fit=fit_correction([]),
        other_cores_busy=round(max(busy, state["busy"]), 2),
    )
    points = []
    for i, arch in enumerate(archs):
        measured = [FitPoint(**r[i]) for r in runs[: setup.rounds]]
        point = median_point(table, arch, measured)
        points.append(point)
        log(f"  network {i + 1}/{len(archs)} {arch.name}: {point.measured_ms:.2f} ms whole"
            f" (median of {len(measured)} rounds), {point.blocks_ms:.2f} ms blocks")  # fmt: skip
    fit = fit_correction(points, correction)
    table = table.model_copy(
        update={
            "fit": fit,
            "other_cores_busy": round(state["busy"], 2),
            "build_seconds": round(elapsed0 + time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fit_seed": seed,
        }
    )
    write_table(out, table)
    part.unlink(missing_ok=True)
    if table.other_cores_busy > BUSY_CORES_WARN:
        log(
            f"warning: other processes kept {table.other_cores_busy:.1f} CPU cores busy while timing;"
            " the table likely reads high, rebuild it on a quiet machine"
        )
    return table


def recalibrate(
    space: Space,
    path: str | Path,
    device: str,
    passes: int = 7,
    iters: int = 10,
    log: Callable[[str], None] = print,
) -> LatencyTable:
    """Measure the table's fit networks again, now, on `device` (`passes` interleaved passes,
    median) and refit its correction; the blocks are kept. A shared host's speed drifts (this
    project's CPU ran whole networks 1.6-2.0x faster than 2 hours before,
    results/latency_model/after15): a correction refitted minutes
    before a search carries today's speed into every prediction, at the cost of a few whole
    networks instead of a table build. The table must be of this device (type and name) and
    space; it is rewritten atomically, once."""
    path = Path(path)
    table = load_table(path)
    info = device_info(device)
    if (table.device.device, table.device.name) != (info.device, info.name):
        raise NasError(
            f"{path}: measured on {table.device.device} {table.device.name!r}, this is {info.device}"
            f" {info.name!r}; recalibrate a table on the device it was measured on"
        )
    archs = fit_archs(space, len(table.fit.points), table.fit_seed)
    if [a.name for a in archs] != [p.arch for p in table.fit.points]:
        raise NasError(
            f"{path}: its fit networks are not those of space {space.name} (seed {table.fit_seed});"
            " build the table again"
        )
    for a in archs:
        blocks_ms(table, a)  # a block the table lacks: one line before any timing
    models = {a.name: build_unet(a, device=device) for a in archs}
    runs: dict[str, list[FitPoint]] = {a.name: [] for a in archs}
    for p in range(passes):  # interleaved passes: load that comes and goes hits all alike
        started = time.perf_counter()
        for a in archs:
            runs[a.name].append(measure_whole(a, table.setup, device, iters, model=models[a.name]))
        log(f"  pass {p + 1}/{passes}: {len(archs)} whole networks in {time.perf_counter() - started:.1f} s")
    points = [median_point(table, a, runs[a.name]) for a in archs]
    fit = fit_correction(points, table.fit.model)
    busy = max((p.other_cores_busy for p in points), default=0.0)
    new = table.model_copy(
        update={
            "fit": fit,
            "recalibrated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "other_cores_busy": round(max(busy, table.other_cores_busy), 2),
        }
    )
    write_table(path, new)
    log(
        f"correction {table.fit.slope:.3f} -> {fit.slope:.3f} x blocks + {fit.intercept_ms:.2f} ms"
        f" ({table.fit.slope / fit.slope:.2f}x the speed at {table.recalibrated or table.created or 'build'})"
    )
    if busy > BUSY_CORES_WARN:
        log(
            f"warning: other processes kept {busy:.1f} CPU cores busy while measuring;"
            " the correction likely reads high, recalibrate on a quiet machine"
        )
    return new
