"""Compare studies of one space: is the search worth running, and what does pruning save?

Per study, trial by trial (in the order trials finished counting toward --trials, by number):
the hypervolume of the (proxy_loss, latency_ms) front so far, the first trial that dominates the
baseline, the best proxy loss under a latency budget (an export --pick rule), and the proxy
optimizer steps and wall time spent. Shared by `nas report` (several --study) and
experiments/studies/search_validity.py, which groups studies (e.g. one sampler over seeds) and shades the
spread.

Hypervolume (Zitzler & Thiele 1998) of a front of minimised (loss, latency) points: the area they
dominate inside the box [0, ref]. In two dimensions it is exact after one sort, so Optuna's private
`optuna._hypervolume` is not needed. It is reported as a fraction of the box ref_loss x ref_latency
(dimensionless, comparable across studies scored with the same reference). The reference point is
a choice: `baseline` (default) is the baseline trial's (loss, latency) x 1.1, so a study scores
only for points near or better than the stock U-Net; `worst` is the worst loss and latency any
compared study observed x 1.1 (scores every trial, but moves when a study is added).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.core.errors import NasError
from nas.search.export import pick_trial
from nas.search.storage import counted

LOSS, LATENCY = "proxy_loss", "latency_ms_p50"  # trial attributes of the two axes
MARGIN = 1.1  # reference point = baseline (or worst observed) x this: 10% slack on both axes
Reference = Literal["baseline", "worst"]
Point = tuple[float, float]  # (proxy_loss, latency_ms)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count toward --trials, by number (retries and surplus trials left out)."""
    return sorted((t for t in study.get_trials(deepcopy=False) if counted(t)), key=lambda t: t.number)


def point(trial: FrozenTrial) -> Point | None:
    """(loss, latency) of a completed trial; None for a pruned, rejected or failed one."""
    a = trial.user_attrs
    if trial.state != TrialState.COMPLETE or LOSS not in a or LATENCY not in a:
        return None
    return float(a[LOSS]), float(a[LATENCY])


def dominates(a: Point, b: Point) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a != b


def hypervolume_2d(points: Sequence[Point], ref: Point) -> float:
    """Area dominated by `points` (both minimised) inside [0, ref]; points beyond ref add nothing."""
    inside = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    area, best_latency = 0.0, ref[1]
    for loss, latency in inside:  # by loss: each point adds the strip its lower latency opens
        if latency < best_latency:
            area += (ref[0] - loss) * (best_latency - latency)
            best_latency = latency
    return area


def baseline_point(study: optuna.Study) -> Point | None:
    """(loss, latency) of the study's first completed baseline trial."""
    for t in finished_trials(study):
        if "baseline" in t.user_attrs and point(t) is not None:
            return point(t)
    return None


def reference_point(studies: Sequence[optuna.Study], how: Reference = "baseline") -> tuple[Point, Reference]:
    """One reference for all `studies` (see the module docstring) and how it was chosen:
    `baseline` falls back to `worst` when no study has a completed baseline (e.g. a budget
    rejected it)."""
    if how == "baseline":
        bases = [b for b in map(baseline_point, studies) if b is not None]
        if bases:
            return (max(b[0] for b in bases) * MARGIN, max(b[1] for b in bases) * MARGIN), "baseline"
    points = [p for s in studies for p in map(point, finished_trials(s)) if p is not None]
    if not points:
        names = ", ".join(s.study_name for s in studies)
        raise NasError(f"studies {names}: no completed trial with proxy_loss and latency yet")
    return (max(p[0] for p in points) * MARGIN, max(p[1] for p in points) * MARGIN), "worst"


def hypervolume_curve(study: optuna.Study, ref: Point) -> list[float]:
    """Hypervolume (fraction of the box [0, ref]) after each finished trial."""
    curve, front = [], []
    for t in finished_trials(study):
        p = point(t)
        if p is not None:
            front.append(p)
        curve.append(hypervolume_2d(front, ref) / (ref[0] * ref[1]))
    return curve


def first_dominating(study: optuna.Study) -> int | None:
    """1-based position (among finished trials) of the first trial that dominates the baseline."""
    base = baseline_point(study)
    if base is None:
        return None
    for i, t in enumerate(finished_trials(study), start=1):
        p = point(t)
        if p is not None and "baseline" not in t.user_attrs and dominates(p, base):
            return i
    return None


def best_under(study: optuna.Study, pick: str) -> float | None:
    """Lowest proxy loss among completed trials satisfying the export rule `pick` (None: none do)."""
    try:
        return float(pick_trial(study, pick).user_attrs[LOSS])
    except NasError:
        return None


def summarize(study: optuna.Study, ref: Point, pick: str) -> dict[str, Any]:
    """The figures of one study (JSON-ready)."""
    trials = finished_trials(study)
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    curve = hypervolume_curve(study, ref)
    return {
        "study": study.study_name,
        "trials": len(trials),
        "states": states,
        "rejected": sum("rejected" in t.user_attrs for t in trials),  # budgets / zero-cost, untrained
        "hypervolume": curve,
        "final_hypervolume": curve[-1] if curve else 0.0,
        "first_dominating_trial": first_dominating(study),
        "best_loss": min((p[0] for p in map(point, trials) if p is not None), default=None),
        "best_loss_under_budget": best_under(study, pick),
        # optimizer steps the proxy trainings ran: a pruned trial stops at its last report
        "proxy_steps": sum(int(t.user_attrs.get("last_step", 0)) for t in trials),
        "trial_seconds": sum(durations),
    }


def fronts(study: optuna.Study) -> list[Point]:
    """Non-dominated (loss, latency) points of the study, by latency."""
    points = [p for p in map(point, finished_trials(study)) if p is not None]
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(set(front), key=lambda p: p[1])


COLORS = ["#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057", "#8d96a3", "#9b5de5", "#f15bb5"]


def plot_hypervolume(groups: dict[str, list[list[float]]], ref: Point, path: Path, how: str) -> None:
    """One line per group (mean over its studies), shaded between their min and max."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (label, curves) in enumerate(groups.items()):
        n = min(len(c) for c in curves)
        if n == 0:
            continue
        xs = list(range(1, n + 1))
        cols = [[c[k] for c in curves] for k in range(n)]
        mean = [sum(col) / len(col) for col in cols]
        color = COLORS[i % len(COLORS)]
        ax.plot(xs, mean, c=color, label=f"{label} ({len(curves)})" if len(curves) > 1 else label)
        if len(curves) > 1:
            ax.fill_between(
                xs, [min(col) for col in cols], [max(col) for col in cols], color=color, alpha=0.2
            )
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume (fraction of the reference box)")
    ax.set_title(f"reference ({how} x {MARGIN:g}): loss {ref[0]:.4g}, latency {ref[1]:.4g} ms", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fronts(groups: dict[str, list[optuna.Study]], path: Path) -> None:
    """One panel per group, shared axes: every completed trial in grey, each study's front as a
    line, the baseline starred."""
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.6, 3.8), sharex=True, sharey=True, squeeze=False)
    for ax, (label, studies) in zip(axes[0], groups.items()):
        for j, study in enumerate(studies):
            points = [p for p in map(point, finished_trials(study)) if p is not None]
            ax.scatter([p[1] for p in points], [p[0] for p in points], c="#c3cad3", s=10)
            front = fronts(study)
            ax.plot([p[1] for p in front], [p[0] for p in front], "o-", ms=3, c=COLORS[j % len(COLORS)])
            base = baseline_point(study)
            if base is not None:
                ax.scatter([base[1]], [base[0]], marker="*", s=160, c="#edae49", edgecolors="k", zorder=5)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("latency p50 (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("proxy validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and min-max over a group's studies (e.g. seeds) of the headline figures."""

    def stats(key: str) -> dict[str, float | None]:
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return {"mean": None, "min": None, "max": None, "n": 0}
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}

    keys = ("final_hypervolume", "first_dominating_trial", "best_loss", "best_loss_under_budget")
    return {k: stats(k) for k in (*keys, "proxy_steps", "trial_seconds")}


def markdown_table(groups: dict[str, dict[str, Any]], pick: str) -> str:
    """One row per group: mean [min, max] over its studies."""

    def cell(s: dict[str, Any], spec: str) -> str:
        if s["mean"] is None:
            return "-"
        if s["min"] == s["max"]:
            return _fmt(s["mean"], spec)
        return f"{_fmt(s['mean'], spec)} [{_fmt(s['min'], spec)}, {_fmt(s['max'], spec)}]"

    lines = [
        f"| group | hypervolume | first trial dominating the baseline | best proxy loss | best proxy loss, `{pick}` "
        "| proxy steps | trial seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, agg in groups.items():
        first = agg["first_dominating_trial"]
        never = agg["n_studies"] - first["n"]
        first_cell = cell(first, ".1f") + (f" ({never} never)" if never else "")
        lines.append(
            f"| {label} | {cell(agg['final_hypervolume'], '.4f')} | {first_cell} | {cell(agg['best_loss'], '.4f')} "
            f"| {cell(agg['best_loss_under_budget'], '.4f')} | {cell(agg['proxy_steps'], '.0f')} "
            f"| {cell(agg['trial_seconds'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def compare(
    groups: dict[str, list[optuna.Study]], out: str | Path, pick: str, how: Reference = "baseline"
) -> dict[str, Any]:
    """Figures, plots and a markdown table for `groups` of studies into `out`; returns the figures
    (also written as out/compare.json)."""
    from nas.core.runfolder import write_json, write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ref, how = reference_point([s for studies in groups.values() for s in studies], how)
    rows = {label: [summarize(s, ref, pick) for s in studies] for label, studies in groups.items()}
    aggregated = {label: {**aggregate(r), "n_studies": len(r)} for label, r in rows.items()}
    plot_hypervolume(
        {k: [r["hypervolume"] for r in v] for k, v in rows.items()}, ref, out / "hypervolume.png", how
    )
    plot_fronts(groups, out / "fronts.png")
    table = markdown_table(aggregated, pick)
    header = (
        f"Hypervolume of the (proxy loss, latency) front as a fraction of the box up to the reference point"
        f" ({how} x {MARGIN:g}: loss {ref[0]:.4g}, latency {ref[1]:.4g} ms); mean [min, max] over each group's"
        " studies. First trial dominating the baseline: its position among finished trials (the"
        " baseline is 1).\n\n"
    )
    write_text(out / "compare.md", header + table)
    result = {"reference": {"how": how, "margin": MARGIN, "point": list(ref)}, "pick": pick}
    result["groups"] = {label: {"studies": rows[label], "summary": aggregated[label]} for label in groups}
    write_json(out / "compare.json", result)
    return result
