"""Latency model validation: how well a per-device lookup table (nas latency-table) predicts
whole-network latency, against MACs and parameter counts as baselines.

Per space: build the table on the device (blocks + the correction fitted on its few networks),
draw N random architectures (distinct, none of the fit networks), measure each whole as the search's
`source: measure` does (nas.cost.measure.measure_latency; --passes interleaved passes over all networks,
default 5, median kept), and compare. Figures: Spearman rho, mean absolute percentage error (MAPE), share of
networks within +-10%. MACs and params are ranked the same way, and, to compare errors on equal
terms, turned into milliseconds by a line fitted on the table's own fit networks. Every measurement
records `other_cores_busy` (CPU cores other processes used meanwhile).

    OMP_NUM_THREADS=1 python experiments/studies/latency_model.py --out results/latency_model --threads 1 \
        --passes 15 --iters 10 --fit 10 --rounds 11
    python experiments/studies/latency_model.py --from-json results/latency_model   # README and plot again
    python experiments/studies/latency_model.py --refit results/latency_model       # new correction, no timing

--refit fits each stored table's correction again on its stored fit networks, rebuilds the
validation networks from the spaces (same seeds; their names are checked) and predicts them again:
the stored whole-network measurements are reused. Besides the table's own correction every run
scores the least-squares line (`line`, the model before `ratio`) on the same data, and how well
the measurement repeats itself: each single pass against the median of the other passes, the
figure no predictor can be expected to beat against that reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from scipy.stats import spearmanr

from nas.core.runfolder import environment, write_json, write_text
from nas.cost.measure import LoadWarning, arch_cost, measure_setup
from nas.cost.table import TableSetup, blocks_ms, fit_correction, load_table, predict, refit, write_table
from nas.cost.table_build import build_table, fit_archs, recalibrate
from nas.space import RandomChoices, build_unet, canonical, load_space, sample_arch

SPACES = ["search_spaces/quickstart.yaml", "search_spaces/decidiffusion_small.yaml"]


def figures(predicted: list[float], measured: list[float]) -> dict[str, float]:
    errors = [100 * (p - m) / m for p, m in zip(predicted, measured)]
    return {
        "spearman": float(spearmanr(predicted, measured).statistic),
        "mape_pct": statistics.fmean(abs(e) for e in errors),
        "within_10pct": sum(abs(e) <= 10 for e in errors) / len(errors),
        "max_abs_error_pct": max(abs(e) for e in errors),
    }


def per_pass(predicted: list[float] | None, passes: list[list[float]]) -> dict[str, float]:
    """Figures against each single pass, averaged over passes; `predicted` None: the median of the
    other passes of the same network predicts it (the measurement's own repeatability)."""
    n = len(passes[0])
    runs = []
    for i in range(n):
        one = [p[i] for p in passes]
        pred = predicted or [statistics.median(p[:i] + p[i + 1 :]) for p in passes]
        runs.append(figures(pred, one))
    return {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}


def ceiling(passes: list[list[float]], draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """What a perfect predictor would score against the median of the passes: each network's median
    taken as its truth, passes drawn again around it from all networks' pass / median ratios (the
    machine's noise), their median scored against the truth; mean and 5th-95th percentiles."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = np.asarray(passes)
    truth = np.median(p, axis=1)
    noise = (p / truth[:, None]).ravel()
    rho, within = [], []
    for _ in range(draws):
        reference = np.median(truth[:, None] * rng.choice(noise, size=p.shape), axis=1)
        rho.append(spearmanr(truth, reference).statistic)
        within.append(np.mean(np.abs(truth / reference - 1) <= 0.1))
    out = {}
    for name, xs in (("spearman", rho), ("within_10pct", within)):
        out.update({name: float(np.mean(xs)), f"{name}_p5": float(np.percentile(xs, 5)),
                    f"{name}_p95": float(np.percentile(xs, 95))})  # fmt: skip
    return out


def score(result: dict, table, archs) -> None:
    """Predict the rows of `result` (measured already) from `table`, with its correction and with
    the least-squares line on the same fit networks, and fill in every figure."""
    rows = result["rows"]
    line = fit_correction(table.fit.points, "line")
    for a, r in zip(archs, rows, strict=True):
        r["blocks_ms"] = blocks_ms(table, a)
        r["predicted_ms"] = predict(table, a)["latency_ms_p50"]
        r["predicted_line_ms"] = line.slope * r["blocks_ms"] + line.intercept_ms
    measured, passes = [r["measured_ms"] for r in rows], [r["passes_ms"] for r in rows]
    result.update(
        correction=table.fit.model,
        predictor=figures([r["predicted_ms"] for r in rows], measured),
        predictor_line=figures([r["predicted_line_ms"] for r in rows], measured),
        # against each network's fastest pass, the least touched by other processes (a loaded machine)
        predictor_vs_fastest_pass=figures([r["predicted_ms"] for r in rows], [min(p) for p in passes]),
        predictor_vs_one_pass=per_pass([r["predicted_ms"] for r in rows], passes),
        repeat_vs_one_pass=per_pass(None, passes),
        perfect_predictor=ceiling(passes),
        fit=table.fit.model_dump(exclude={"points"}),
        fit_line=line.model_dump(exclude={"points"}),
    )


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def draw(space, count: int, exclude: set[str], seed: int):
    chooser, archs, seen = RandomChoices(seed), [], set(exclude)
    for i in range(100 * count):
        arch = sample_arch(space, chooser, name=f"{space.name}-v{i}")
        key = json.dumps(canonical(arch), sort_keys=True)
        if key not in seen:
            seen.add(key)
            archs.append(arch)
        if len(archs) == count:
            break
    return archs


SEED = 100  # of the validation networks (a --refit draws them again)


def validate_space(space_path, device: str, out: Path, count: int = 30, rounds: int = 7, passes: int = 5,
                   iters: int = 5, fit: int = 6, seed: int = SEED, schedule: str = "interleaved",
                   stale: Path | None = None) -> dict:  # fmt: skip
    """`schedule`: `interleaved` measures one pass over the validation networks after each round of
    the table build (blocks, then fit networks, then these; rounds = passes), so the table and its
    reference see the same machine state; `after` builds the table first and measures after it, as
    a user would, and so also scores how far the machine's speed drifted in between. `stale`: a
    folder of tables built earlier (another session); each is scored as stored and after
    `nas latency-table --recalibrate` (its fit networks measured again just before the validation
    passes, `rounds` passes)."""
    space = load_space(space_path)
    lat = space.latency
    if schedule == "interleaved":
        rounds = passes
    setup = TableSetup(dtype=lat.dtype, batch=lat.batch, warmup=3, rounds=rounds)
    table_path = out / f"table_{space.name}.json"
    partial = table_path.with_name(table_path.name + ".partial")
    partial.unlink(missing_ok=True)  # a fresh build: its time is one of the figures
    fitted = fit_archs(space, fit)
    archs = draw(space, count, {json.dumps(canonical(a), sort_keys=True) for a in fitted}, seed)
    models = {a.name: build_unet(a) for a in archs}
    runs: dict[str, list[dict]] = {a.name: [] for a in archs}
    seconds = [0.0]

    def one_pass(p: int) -> None:
        started = time.perf_counter()
        for a in archs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LoadWarning)  # recorded per measurement instead
                # the space's setup, eager fp32 as the tables are built (their runtime is not timed)
                m = measure_setup(
                    models[a.name], a, lat, device=device, iters=iters, runtime=None, precision="fp32"
                )
            runs[a.name].append({"ms": m.latency_ms_p50, "other_cores_busy": m.other_cores_busy})
        seconds[0] += time.perf_counter() - started
        print(f"  {space.name}: validation pass {p + 1}/{passes} over {len(archs)} networks")

    hook = one_pass if schedule == "interleaved" else None
    table = build_table(space, table_path, device, setup, fit_count=fit, fit_iters=10, after_round=hook)
    if schedule == "interleaved":  # its build time without the validation passes inside it
        table = table.model_copy(update={"build_seconds": round(table.build_seconds - seconds[0], 1)})
        write_table(table_path, table)
    else:
        extra = {}
        if stale is not None:
            old = load_table(stale / f"table_{space.name}.json")
            recal = out / f"table_{space.name}_recalibrated.json"
            write_table(recal, old)
            started = time.perf_counter()
            extra = {"stale": old, "recalibrated": recalibrate(space, recal, device, rounds, 10)}
            recal_seconds = time.perf_counter() - started
        for p in range(passes):  # interleaved: load that comes and goes hits every network alike
            one_pass(p)
    whole_seconds = seconds[0]
    rows = []
    for a in archs:
        cost = arch_cost(a, batch=lat.batch)
        rows.append({
            "arch": a.name, "measured_ms": statistics.median(r["ms"] for r in runs[a.name]),
            "passes_ms": [r["ms"] for r in runs[a.name]],
            "other_cores_busy": max(r["other_cores_busy"] for r in runs[a.name]),
            "macs": cost["macs"], "params": cost["params"],
        })  # fmt: skip
    measured = [r["measured_ms"] for r in rows]
    fit_cost = {p.arch: arch_cost(a, batch=lat.batch) for p, a in zip(table.fit.points, fitted)}
    fit_ms = [p.measured_ms for p in table.fit.points]
    result: dict = {"space": space.name, "count": len(rows), "schedule": schedule, "rows": rows}
    score(result, table, archs)
    if schedule == "after" and stale is not None:
        for key, other in extra.items():
            result[key] = figures([predict(other, a)["latency_ms_p50"] for a in archs], measured)
            result[f"{key}_slope"] = other.fit.slope
        result.update(stale_created=extra["stale"].created, recalibration_seconds=recal_seconds)
    for key in ("macs", "params"):  # the same calibration budget: a line on the table's fit networks
        slope, intercept = _line([fit_cost[p.arch][key] for p in table.fit.points], fit_ms)
        result[key] = figures([slope * r[key] + intercept for r in rows], measured)
    result.update(
        table_build_seconds=table.build_seconds,
        table_blocks=len(table.blocks),
        table_fit_networks=len(table.fit.points),
        table_other_cores_busy=table.other_cores_busy,
        whole_seconds_per_network=whole_seconds / len(rows) / passes,
        whole_seconds_30=30 * whole_seconds / len(rows) / passes,
        max_other_cores_busy=max(r["other_cores_busy"] for r in rows),
        median_other_cores_busy=statistics.median(r["other_cores_busy"] for r in rows),
    )
    result["rows"] = result.pop("rows")  # last in the file: the figures read first
    return result


def refit_space(result: dict, space_paths: list[str], out: Path) -> None:
    """Fit the stored table's correction again, predict the stored rows again (no timing)."""
    spaces = {s.name: s for s in map(load_space, space_paths)}
    space = spaces.get(result["space"])
    if space is None:
        raise SystemExit(f"--refit: space {result['space']} is not among --spaces {' '.join(space_paths)}")
    path = out / f"table_{space.name}.json"
    table = refit(load_table(path))
    write_table(path, table)
    fitted = fit_archs(space, len(table.fit.points))
    if [a.name for a in fitted] != [p.arch for p in table.fit.points]:
        raise SystemExit(f"{path}: fit networks are not those fit_archs draws again; measure anew")
    archs = draw(space, result["count"], {json.dumps(canonical(a), sort_keys=True) for a in fitted}, SEED)
    if [a.name for a in archs] != [r["arch"] for r in result["rows"]]:
        raise SystemExit(f"{space.name}: validation networks drawn again differ from the stored rows")
    score(result, table, archs)
    result["rows"] = result.pop("rows")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.6))
    for ax, r in zip(axes if len(results) > 1 else [axes], results):
        xs, ys = [row["measured_ms"] for row in r["rows"]], [row["predicted_ms"] for row in r["rows"]]
        old = [row.get("predicted_line_ms", row["predicted_ms"]) for row in r["rows"]]
        lo, hi = min(xs + ys + old) * 0.9, max(xs + ys + old) * 1.1
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.9", label="+-10%")
        if r.get("correction", "line") != "line":
            ax.scatter(xs, old, s=14, facecolors="none", edgecolors="0.5", label="line (before)")
        ax.scatter(xs, ys, s=14, label=r.get("correction", "line"))
        p = r["predictor"]
        ax.set_title(f"{r['space']}: rho {p['spearman']:.3f}, MAPE {p['mape_pct']:.1f}%", fontsize=10)
        ax.set_xlabel("measured whole (ms)")
        ax.set_ylabel("predicted from table (ms)")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def readme(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        "# Latency model: lookup table vs whole-network measurement",
        "",
        f"Made by `experiments/studies/latency_model.py` on {env['cpu']} ({env['cpu_cores']} cores), torch"
        f" {env['torch']}, {summary['threads']} threads, device `{summary['device']}`, {summary['date']}."
        " Per space: the table is built (every block timed, correction fitted on its fit networks),"
        f" {summary['results'][0]['count']} random other networks are measured whole"
        f" (nas.cost.measure.measure_latency, {summary.get('passes', 5)} interleaved passes of"
        f" {summary.get('iters', 5)} timed forwards, median) and predicted from the table."
        + (
            " Schedule `interleaved`: one validation pass after each round of the table build (blocks,"
            " fit networks, validation networks), so table and reference see the same machine state."
            if summary.get("schedule") == "interleaved"
            else " Schedule `after`: the validation passes follow the build, as a user's use of a table does;"
            " a change in the machine's speed between the two shows as error."
        ),
        "MACs and params are made into milliseconds by a line through the same fit networks."
        " `ratio`: prediction = median over the fit networks of (measured / blocks) x blocks;"
        " `line`: least-squares slope and intercept through the same fit networks (the model before)."
        " The `vs one pass` rows score against each single pass (mean over passes); `repeat` is the"
        " median of a network's other passes predicting that pass, the measurement's own repeatability.",
        "",
        "| space | figure | Spearman rho | MAPE | within +-10% | max abs error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in summary["results"]:
        for key, label in (
            ("predictor", f"**table ({r.get('correction', 'line')})**"),
            ("predictor_line", "table (line)"),
            ("stale", "table built in an earlier session, as stored"),
            ("recalibrated", "the same, `--recalibrate`d just before"),
            ("predictor_vs_fastest_pass", "table vs fastest pass"),
            ("predictor_vs_one_pass", "table vs one pass"),
            ("repeat_vs_one_pass", "repeat: other passes vs one pass"),
            ("macs", "MACs (linear)"),
            ("params", "params (linear)"),
        ):
            if key not in r or (key == "predictor_line" and r.get("correction", "line") == "line"):
                continue
            f = r[key]
            lines.append(
                f"| {r['space']} | {label} | {f['spearman']:.3f} | {f['mape_pct']:.1f}% |"
                f" {100 * f['within_10pct']:.0f}% | {f['max_abs_error_pct']:.0f}% |"
            )
    for r in summary["results"]:
        if "recalibration_seconds" in r:
            lines += ["", f"{r['space']}: the table built {r['stale_created']} had the correction"
                      f" {r['stale_slope']:.3f} x blocks; `--recalibrate` ({r['table_fit_networks']} fit networks"
                      f" measured again, {r['recalibration_seconds']:.0f} s) made it {r['recalibrated_slope']:.3f}."]  # fmt: skip
    lines += ["", "| space | blocks | table build (incl. fit networks) | 30 networks measured whole (1 pass) |"
              " other cores busy (table / whole, median / max) |", "|---|---:|---:|---:|---|"]  # fmt: skip
    for r in summary["results"]:
        lines.append(
            f"| {r['space']} | {r['table_blocks']} | {r['table_build_seconds']:.0f} s | {r['whole_seconds_30']:.0f} s |"
            f" {r['table_other_cores_busy']:.1f} / {r['median_other_cores_busy']:.1f}, {r['max_other_cores_busy']:.1f} |"
        )
    lines += ["", "What a perfect predictor would score against the median of the passes (the measurement noise"
              " drawn again from the passes' spread around their medians, 1,000 draws; mean [5th-95th percentile]):",
              "", "| space | Spearman rho | within +-10% |", "|---|---|---|"]  # fmt: skip
    for r in summary["results"]:
        c = r.get("perfect_predictor")
        if c:
            lines.append(
                f"| {r['space']} | {c['spearman']:.3f} [{c['spearman_p5']:.3f}-{c['spearman_p95']:.3f}] |"
                f" {100 * c['within_10pct']:.0f}% [{100 * c['within_10pct_p5']:.0f}-{100 * c['within_10pct_p95']:.0f}%] |"
            )
    lines += [
        "",
        "| space | correction | fit networks | mean abs error on them | on each left out |",
        "|---|---|---:|---:|---:|",
    ]
    for r in summary["results"]:
        for fit in (r["fit"], r.get("fit_line")):
            if fit is not None and not (fit is not r["fit"] and fit.get("model") == r["fit"].get("model")):
                loo = fit.get("loo_abs_error_pct")
                lines.append(
                    f"| {r['space']} | {fit.get('model', 'line')} ({fit['slope']:.3f} x blocks +"
                    f" {fit['intercept_ms']:.2f} ms) | {r['table_fit_networks']} | {fit['mean_abs_error_pct']:.1f}% |"
                    f" {'-' if loo is None else f'{loo:.1f}%'} |"
                )
    lines += ["", "![predicted vs measured](predicted_vs_measured.png)", "", summary.get("note", "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/latency_model"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--count", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per table block")
    ap.add_argument("--passes", type=int, default=5, help="interleaved passes over the whole networks")
    ap.add_argument("--iters", type=int, default=5, help="timed forwards per network per pass")
    ap.add_argument("--fit", type=int, default=6, help="whole networks the table's correction is fitted on")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--spaces", nargs="+", default=SPACES)
    ap.add_argument("--schedule", choices=["interleaved", "after"], default="interleaved",
                    help="validation passes inside the table build's rounds, or after the build")  # fmt: skip
    ap.add_argument("--stale", type=Path, default=None,
                    help="with --schedule after: tables built earlier, scored as stored and recalibrated")  # fmt: skip
    ap.add_argument("--note", default="", help="free text appended to the README (machine load, caveats)")
    ap.add_argument("--from-json", type=Path, default=None, help="redo README and plot from validation.json")
    ap.add_argument(
        "--refit", type=Path, default=None, help="refit the tables in DIR, predict again, no timing"
    )
    args = ap.parse_args()
    if args.refit:
        summary = json.loads((args.refit / "validation.json").read_text())
        for r in summary["results"]:
            refit_space(r, args.spaces, args.refit)
        summary["note"] = args.note or summary.get("note", "")
        out = args.refit
    elif args.from_json:
        summary = json.loads((args.from_json / "validation.json").read_text())
        summary["note"] = args.note or summary.get("note", "")
        out = args.from_json
    else:
        torch.set_num_threads(args.threads)  # the same for block timing and whole networks
        out = args.out
        results = [validate_space(s, args.device, out, args.count, args.rounds, args.passes, args.iters, args.fit,
                                  schedule=args.schedule, stale=args.stale) for s in args.spaces]  # fmt: skip
        summary = {"device": args.device, "threads": torch.get_num_threads(), "environment": environment(),
                   "date": time.strftime("%Y-%m-%d %H:%M"), "note": args.note, "passes": args.passes,
                   "iters": args.iters, "rounds": args.rounds, "schedule": args.schedule, "results": results}  # fmt: skip
    write_json(out / "validation.json", summary)
    plot(summary["results"], out / "predicted_vs_measured.png")
    write_text(out / "README.md", readme(summary))
    for r in summary["results"]:
        print(r["space"], {k: r.get(k) for k in ("predictor", "predictor_line", "repeat_vs_one_pass")})


if __name__ == "__main__":
    main()
