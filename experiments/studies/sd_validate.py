"""A latency table checked against random architectures of its space measured whole, one network in
memory at a time (an SD-size network is 3-6 GB in fp32; experiments/studies/latency_model.py keeps
all of them), for experiments/studies/sd_scale.py."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from experiments.studies.latency_model import SEED, draw, figures
from nas.cost.table import load_table, measure_whole, predict
from nas.cost.table_build import fit_archs
from nas.space import build_unet, canonical, load_space


def validate(space_path: Path, table_path: Path, count: int, iters: int) -> dict:
    """Spearman rho, MAPE and share within +-10% of the table's predictions against `count` random
    architectures (none of the fit networks) measured whole as the table's fit networks were."""
    space, table = load_space(space_path), load_table(table_path)
    fitted = fit_archs(space, len(table.fit.points), table.fit_seed or 0)
    archs = draw(space, count, {json.dumps(canonical(a), sort_keys=True) for a in fitted}, SEED)
    rows = []
    for i, arch in enumerate(archs):
        started = time.perf_counter()
        model = build_unet(arch)
        point = measure_whole(arch, table.setup, str(table.device.device), iters, model=model)
        params = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        rows.append({"arch": arch.name, "params": params, "measured_ms": point.measured_ms,
                     "predicted_ms": predict(table, arch)["latency_ms_p50"],
                     "other_cores_busy": point.other_cores_busy,
                     "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
        print(
            f"validation {i + 1}/{len(archs)} {arch.name}: {params / 1e6:.0f}M params, "
            f"{point.measured_ms:.0f} ms whole, {rows[-1]['predicted_ms']:.0f} ms predicted",
            flush=True,
        )
    result = figures([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
    return {**result, "count": len(rows), "iters": iters, "rows": rows}
