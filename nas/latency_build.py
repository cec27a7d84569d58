"""Build a latency table: time every block of a space on a device, then fit the correction on a few
whole networks. Resumable: the rounds done and the networks measured so far are kept in
TABLE.json.partial (atomic writes) and picked up by a rerun with the same setup; the table itself
is written once, complete."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nas.latency_blocks import describe, space_blocks
from nas.latency_table import (
    BUSY_CORES_WARN,
    DEFAULT_CORRECTION,
    BlockTime,
    FitPoint,
    LatencyTable,
    TableSetup,
    blocks_ms,
    device_info,
    fit_correction,
    measure_whole,
    time_blocks,
    write_table,
)
from nas.runfolder import read_json, write_json
from nas.space import RandomChoices, extreme_archs, sample_arch
from nas.space.schema import Arch, Space

FIT_PASSES = 3  # whole-network passes over the fit networks; each network's median is fitted


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
) -> LatencyTable:
    """Measure the table of `space` on `device` and write it to `out` (atomically, once);
    `correction` is a key of nas.latency_table.CORRECTIONS."""
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
    calls, busy = time_blocks(blocks, setup, device, state["rounds"], save, log)
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
    archs = fit_archs(space, fit_count, seed)
    runs: list[list[dict]] = state["fit"]  # per pass, per network: a measured FitPoint
    for p in range(FIT_PASSES):  # interleaved passes: load that comes and goes hits all alike
        if p == len(runs):
            runs.append([])
        for i, arch in enumerate(archs[len(runs[p]) :], start=len(runs[p])):
            point = measure_whole(arch, setup, device, fit_iters)
            runs[p].append(point.model_dump(mode="json"))
            state["busy"] = max(state["busy"], point.other_cores_busy)
            save()
            if p == FIT_PASSES - 1:
                mine = [FitPoint(**r[i]).measured_ms for r in runs]
                log(
                    f"  network {i + 1}/{len(archs)} {arch.name}: {statistics.median(mine):.2f} ms whole"
                    f" (median of {len(mine)} passes), {blocks_ms(table, arch):.2f} ms blocks"
                )
    points = []
    for i, arch in enumerate(archs):
        measured = [FitPoint(**r[i]) for r in runs]
        points.append(
            FitPoint(
                arch=arch.name,
                blocks_ms=blocks_ms(table, arch),
                measured_ms=statistics.median(m.measured_ms for m in measured),
                measured_p90_ms=statistics.median(m.measured_p90_ms for m in measured),
                other_cores_busy=max(m.other_cores_busy for m in measured),
            )
        )
    fit = fit_correction(points, correction)
    table = table.model_copy(
        update={
            "fit": fit,
            "other_cores_busy": round(state["busy"], 2),
            "build_seconds": round(elapsed0 + time.perf_counter() - started, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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
