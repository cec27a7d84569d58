"""The comparison of the `variants` stage: one table of every run's cost and quality against steps,
the seed's three figures (per-step speedup, steps to match the baseline, combined speedup) and the
ablation table. Writes variants/comparison.{json,md,png}. And the few_step stage's table
(`few_step_rows`): the evaluate stage's rows beside the few-step student's, with U-Net calls per
image and images/s; few_step/comparison.{json,md}.

Matching is strict and on the figures as measured: the candidate matches the baseline at the
fewest evaluated steps whose alignment is at least the baseline's at `match_steps` (and, reported
separately, whose Frechet distance is at most the baseline's). No tolerance is applied, and a step
count that was not evaluated cannot be the answer, so a coarse step grid rounds against the
candidate, never in its favour.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.core.config import read_yaml
from nas.core.runfolder import (
    ARCH,
    CONFIG,
    EVAL_FILE,
    MAIN,
    eval_folder,
    relative_paths,
    run_folder,
    write_json,
    write_text,
)

if TYPE_CHECKING:  # the stage's settings only; the pipeline imports this module, not the reverse
    from nas.pipeline.variants import VariantsStage

LATENCY_BATCH = 2  # classifier-free guidance: conditional + unconditional in one U-Net call
LATENCY_ROUNDS = 5  # interleaved rounds (baseline, candidate, baseline, ...): drift hits both alike
LATENCY_ITERS = 10  # timed forwards per round


def _run_info(root: Path, name: str, source: str) -> dict[str, Any]:
    """A run's recipe and quality; `source` is the trained run it evaluates (itself unless reused)."""
    run = run_folder(root, source)
    config = read_yaml(run / CONFIG)
    report = json.loads((eval_folder(root, name) / EVAL_FILE).read_text())
    summary = run / "summary.json"
    trained = json.loads(summary.read_text()) if summary.is_file() else {}
    return {
        "run": str(run),
        "eval_dir": str(eval_folder(root, name)),
        "arch_file": str(run / ARCH),
        "recipe": config.get("name"),
        "diffusion": config.get("diffusion"),
        "ema": config.get("ema"),
        "max_steps": config.get("max_steps"),
        "lr": config.get("lr"),
        "diverged": bool(trained.get("diverged", False)),  # final validation loss > 2x its best
        "weights": report["weights"],
        "spacing": report["timestep_spacing"],
        "quality": {
            row["steps"]: {
                k: row[k] for k in ("alignment", "frechet_distance", "chance_alignment") if k in row
            }
            for row in report["results"]
        },
        "reference": report.get("reference", {}),
        "images": report["images"],
    }


def measure_latencies(arch_files: dict[str, str]) -> tuple[dict[str, float], float]:
    """Median U-Net forward latency (ms, batch 2, fp32, this machine) per distinct architecture,
    interleaved rounds so that the ratio between them is robust to load changes; and the most CPU
    cores other processes kept busy meanwhile (over 0.5 warns: the absolute figures read high)."""
    import torch

    from nas.cost.measure import measure_latency
    from nas.space import build_unet, load_arch

    archs = {name: load_arch(path) for name, path in arch_files.items()}
    models = {name: build_unet(arch).eval() for name, arch in archs.items()}
    times: dict[str, list[float]] = {name: [] for name in archs}
    busy = 0.0  # most CPU cores other processes kept busy during any one measurement
    with torch.inference_mode():
        for _ in range(LATENCY_ROUNDS):
            for name, model in models.items():
                lat = measure_latency(model, archs[name], batch=LATENCY_BATCH, warmup=2, iters=LATENCY_ITERS)
                times[name].append(lat.latency_ms_p50)
                busy = max(busy, lat.other_cores_busy)
    return {name: statistics.median(values) for name, values in times.items()}, busy


def steps_to_match(candidate: dict, baseline: dict, match_steps: int, metric: str) -> int | None:
    """Fewest evaluated steps at which the candidate is at least as good as the baseline at match_steps."""
    target = baseline["quality"][match_steps][metric]
    for steps in sorted(candidate["quality"]):
        value = candidate["quality"][steps][metric]
        if (value >= target) if metric == "alignment" else (value <= target):
            return steps
    return None


def compare(stage: VariantsStage, root: Path) -> dict[str, Any]:
    from nas.cost.measure import arch_cost
    from nas.space import load_arch

    names = [MAIN] + [v.name for v in stage.runs]
    labels = {MAIN: "main (searched, train stage)"} | {v.name: v.label or v.name for v in stage.runs}
    source = {v.name: v.reuse or v.name for v in stage.runs} | {MAIN: MAIN}
    runs = {name: _run_info(root, name, source[name]) for name in names}
    trained = [name for name in names if source[name] == name]
    latency, busy = measure_latencies({name: runs[name]["arch_file"] for name in trained})
    costs = {name: arch_cost(load_arch(runs[name]["arch_file"])) for name in trained}  # once per model
    for name in names:
        cost = costs[source[name]]
        runs[name].update(
            label=labels[name], params=cost["params"], macs=cost["macs"], latency_ms=latency[source[name]]
        )
    result: dict[str, Any] = {"latency": {"batch": LATENCY_BATCH, "rounds": LATENCY_ROUNDS, "iters": LATENCY_ITERS,
                                          "unit": "ms, median U-Net forward, fp32, this machine",
                                          "other_cores_busy_max": round(busy, 2)},
                              "runs": runs}  # fmt: skip
    c = stage.compare
    if c is not None:
        base, cand = runs[c.baseline], runs[c.candidate]  # steps checked by check_compare_steps
        per_step = base["latency_ms"] / cand["latency_ms"]
        match = steps_to_match(cand, base, c.match_steps, "alignment")
        match_fd = steps_to_match(cand, base, c.match_steps, "frechet_distance")
        result["compare"] = {
            "baseline": c.baseline,
            "candidate": c.candidate,
            "match_steps": c.match_steps,
            "per_step_speedup": per_step,
            f"steps_to_match_baseline_{c.match_steps}": match,
            f"steps_to_match_baseline_{c.match_steps}_fd": match_fd,
            "combined_speedup": per_step * c.match_steps / match if match else None,
            "combined_speedup_fd": per_step * c.match_steps / match_fd if match_fd else None,
            "params_ratio": cand["params"] / base["params"],
            "macs_ratio": cand["macs"] / base["macs"],
            # a match at the fewest evaluated steps is an upper bound (the grid goes no lower); and
            # when the baseline gains nothing from more steps, it compares overall quality, not steps
            "fewest_steps_evaluated": min(cand["quality"]),
            "baseline_alignment_gain": base["quality"][c.match_steps]["alignment"]
            - base["quality"][min(base["quality"])]["alignment"],
            "baseline_fd_gain": base["quality"][min(base["quality"])]["frechet_distance"]
            - base["quality"][c.match_steps]["frechet_distance"],
        }
        ablations = []
        ref = cand["quality"].get(c.ablation_steps)
        for v in stage.runs:
            row = runs[v.name]["quality"].get(c.ablation_steps)
            if v.ablates and ref and row:
                ablations.append({"ablates": v.ablates, "run": v.name, "steps": c.ablation_steps,
                                  "alignment": row["alignment"], "d_alignment": row["alignment"] - ref["alignment"],
                                  "frechet_distance": row["frechet_distance"],
                                  "d_frechet_distance": row["frechet_distance"] - ref["frechet_distance"]})  # fmt: skip
        result["ablations"] = ablations
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _match_caveats(c: dict[str, Any]) -> list[str]:
    """Say when the step figures are bounds, or measure overall quality rather than steps."""
    m, fewest = c["match_steps"], c.get("fewest_steps_evaluated")
    notes: list[str] = []
    if fewest is None:
        return notes
    if fewest in (c[f"steps_to_match_baseline_{m}"], c[f"steps_to_match_baseline_{m}_fd"]):
        notes.append(f"- a match at {fewest} steps, the fewest evaluated, is an upper bound on the steps "
                     "(and the combined speedup a lower bound): evaluate fewer steps to find the crossing")  # fmt: skip
    if c["baseline_alignment_gain"] <= 0 or c["baseline_fd_gain"] <= 0:
        notes.append(f"- the baseline gains little from more steps ({fewest} -> {m}: alignment "
                     f"{c['baseline_alignment_gain']:+.3f}, Frechet distance {-c['baseline_fd_gain']:+.0f}); "
                     "where it gains nothing, matching it says the candidate is better overall, not that it "
                     "needs fewer steps")  # fmt: skip
    return notes


def write_comparison(result: dict[str, Any], folder: Path) -> None:
    from nas.cost.measure import BUSY_CORES_WARN

    # paths relative to the experiment folder (results/<experiment>/), where the file is also copied
    write_json(folder / "comparison.json", relative_paths(result, folder.parent))
    runs = result["runs"]
    steps = sorted({s for r in runs.values() for s in r["quality"]})
    lines = ["| run | recipe | sampling | params | GMACs | latency ms | " + " | ".join(f"align@{s}" for s in steps)
             + " | " + " | ".join(f"FD@{s}" for s in steps) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * (2 * len(steps))]  # fmt: skip
    for r in runs.values():
        q = r["quality"]
        lines.append(
            f"| {r['label']} | {r['recipe']} | {r['spacing']}, {r['weights']} | {r['params'] / 1e6:.2f}M | "
            f"{r['macs'] / 1e9:.3f} | {r['latency_ms']:.1f} | "
            + " | ".join(_fmt(q.get(s, {}).get("alignment"), ".3f") for s in steps)
            + " | "
            + " | ".join(_fmt(q.get(s, {}).get("frechet_distance"), ".0f") for s in steps)
            + " |"
        )
    if "compare" in result:
        c = result["compare"]
        m = c["match_steps"]
        lines += ["", f"Baseline `{c['baseline']}`, candidate `{c['candidate']}`:", "",
                  f"- per-step speedup (U-Net latency ratio): **{c['per_step_speedup']:.2f}x**; params x{c['params_ratio']:.2f}, MACs x{c['macs_ratio']:.2f}",
                  f"- steps for the candidate to match the baseline's alignment at {m} steps: **{_fmt(c[f'steps_to_match_baseline_{m}'], 'd')}** "
                  f"(Frechet distance: {_fmt(c[f'steps_to_match_baseline_{m}_fd'], 'd')})",
                  f"- combined speedup to equal quality: **{_fmt(c['combined_speedup'], '.2f')}x** "
                  f"(on Frechet distance: {_fmt(c['combined_speedup_fd'], '.2f')}x)"]  # fmt: skip
        lines += _match_caveats(c)
    diverged = [r["label"] for r in runs.values() if r.get("diverged")]
    if diverged:
        lines += ["", f"Warning: these trainings diverged (final validation loss over twice its best): "
                  f"{', '.join(diverged)}; their figures say nothing about the recipe or the layout."]  # fmt: skip
    busy = result["latency"].get("other_cores_busy_max", 0.0)
    if busy > BUSY_CORES_WARN:
        lines += ["", f"Warning: other processes kept up to {busy:.1f} CPU cores busy while latencies were "
                  "measured; the absolute figures read high (the interleaved ratios less so)."]  # fmt: skip
    if result.get("ablations"):
        lines += [
            "",
            "| switched off | run | alignment | change | Frechet distance | change |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for a in result["ablations"]:
            lines.append(f"| {a['ablates']} | {a['run']} | {a['alignment']:.3f} | {a['d_alignment']:+.3f} | "
                         f"{a['frechet_distance']:.0f} | {a['d_frechet_distance']:+.0f} |")  # fmt: skip
    write_text(folder / "comparison.md", "\n".join(lines) + "\n")
    _plot(result, folder / "comparison.png")
    _plot_grids(result, folder / "comparison_grids.png")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for r in result["runs"].values():
        steps = sorted(r["quality"])
        if len(steps) < 2:
            continue  # ablations evaluated at one step count: see the table
        left.plot(steps, [r["quality"][s]["alignment"] for s in steps], "o-", label=r["label"])
        right.plot(steps, [r["quality"][s]["frechet_distance"] for s in steps], "o-", label=r["label"])
    ref = next(iter(result["runs"].values()))["reference"]
    if "real_alignment" in ref:
        left.axhline(ref["real_alignment"], color="gray", ls=":", label="real images")
        left.axhline(ref["vae_alignment"], color="tab:green", ls="-.", label="real through the VAE")
    if "fd_real_floor" in ref:
        right.axhline(ref["fd_real_floor"], color="gray", ls=":", label="real vs real (floor)")
    left.set_ylabel("prompt alignment")
    right.set_ylabel("Frechet distance (evaluator features)")
    for ax in (left, right):
        ax.set_xlabel("denoising steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


GRID_ROWS = 2  # rows of 8 samples per run in comparison_grids.png: same prompts and seeds in every row


def _grid_panels(result: dict[str, Any]) -> list[tuple[str, Path]]:
    """(title, grid PNG) to show: the baseline at match_steps, the candidate where it matches and at
    match_steps, then the other runs evaluated at match_steps; grids that were not written are skipped."""
    runs, c = result["runs"], result.get("compare")
    m = c["match_steps"] if c else max(max(r["quality"]) for r in runs.values())
    order: list[tuple[str, int]] = []
    if c:
        order.append((c["baseline"], m))
        match = c.get(f"steps_to_match_baseline_{m}")
        if match and match != m:
            order.append((c["candidate"], match))
    order += [(name, m) for name, r in runs.items() if m in r["quality"] and (name, m) not in order]
    panels = []
    for name, steps in order:
        path = Path(runs[name].get("eval_dir", "/nonexistent")) / f"grid_{steps:03d}.png"
        if path.is_file():
            panels.append((f"{runs[name]['label']}: {steps} steps", path))
    return panels


def _plot_grids(result: dict[str, Any], path: Path) -> None:
    """The first GRID_ROWS rows of each run's sample grid, one under the other, to look at."""
    panels = _grid_panels(result)
    if not panels:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from nas.evaluate.quality import GRID_COLUMNS
    from nas.sample.generate import GRID_PAD

    crops = []
    for _, file in panels:
        grid = Image.open(file).convert("RGB")
        cell = (grid.width - GRID_PAD) // GRID_COLUMNS  # image + its border
        crops.append(grid.crop((0, 0, grid.width, min(grid.height, GRID_ROWS * cell + GRID_PAD))))
    width = 8.0
    heights = [width * c.height / c.width for c in crops]
    fig, axes = plt.subplots(len(crops), 1, figsize=(width, sum(heights) + 0.35 * len(crops)), dpi=100,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for ax, (title, _), crop in zip(axes[:, 0], panels, crops):
        ax.imshow(crop)
        ax.set_title(title, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the few_step stage's rows -----------------------------------------------------------------

SPLIT_PARTS = ("text_encoder", "unet", "vae_decode")  # nas/sample/timing.py's parts, when a row has them


def _unet_calls(row: dict[str, Any], guidance: float, embedded: bool) -> float:
    """U-Net evaluations per image: as measured (the row's split) where the report has it, else
    steps x 2 with classifier-free guidance, steps x 1 for a guidance-embedded student or guidance 1."""
    measured = (row.get("split") or {}).get("unet_evals_per_image")
    if measured is not None:
        return float(measured)
    return float(row["steps"] * (1 if embedded or guidance <= 1 else 2))


def few_step_rows(main: dict[str, Any] | None, student: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated step count: the evaluate stage's (`main`: its eval.json, None when it
    was skipped), then the few-step student's (few_step/eval/eval.json): quality, U-Net calls per
    image, images/s and, where the report splits it, seconds in text encoder / U-Net / VAE decode."""
    rows = []
    for name, report, embedded in (("main", main, False), ("few_step", student, True)):
        if report is None:
            continue
        for r in report["results"]:
            row: dict[str, Any] = {"run": name, "scheduler": report["scheduler"], "steps": r["steps"],
                                   "guidance": report["guidance"],
                                   "unet_calls_per_image": _unet_calls(r, report["guidance"], embedded)}  # fmt: skip
            row.update(
                {k: r[k] for k in ("alignment", "chance_alignment", "frechet_distance", "fid") if k in r}
            )
            row.update({k: r[k] for k in ("seconds", "images_per_s") if k in r})
            split = r.get("split") or {}
            seconds = {part: split.get(f"{part}_s", split.get(part)) for part in SPLIT_PARTS}
            if all(isinstance(v, int | float) for v in seconds.values()):
                row["split_s"] = seconds
            rows.append(row)
    return rows


def write_few_step(rows: list[dict[str, Any]], folder: Path) -> None:
    """few_step/comparison.{json,md}: the table of few_step_rows."""
    write_json(folder / "comparison.json", {"rows": rows})
    labels = {"main": "main (train stage)", "few_step": "few-step student"}
    lines = ["| run | scheduler | steps | guidance | U-Net calls / image | alignment | Frechet distance "
             "| images/s | s: text encoder / U-Net / VAE decode |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        split = r.get("split_s")
        parts = " / ".join(f"{split[p]:.2f}" for p in SPLIT_PARTS) if split else "-"
        lines.append(f"| {labels[r['run']]} | {r['scheduler']} | {r['steps']} | {r['guidance']:g} | "
                     f"{r['unet_calls_per_image']:g} | {_fmt(r.get('alignment'), '.3f')} | "
                     f"{_fmt(r.get('frechet_distance'), '.1f')} | {_fmt(r.get('images_per_s'), '.2f')} | {parts} |")  # fmt: skip
    lines += ["", "U-Net calls per image: steps x 2 with classifier-free guidance, steps x 1 for the "
              "guidance-embedded student (measured where the evaluation recorded it)."]  # fmt: skip
    write_text(folder / "comparison.md", "\n".join(lines) + "\n")
