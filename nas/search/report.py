"""Plots and a table for a study: Pareto front with baselines marked, optimisation history,
parameter importances (Optuna's matplotlib visualisation), and a markdown summary."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

from nas.core.runfolder import write_text
from nas.search.export import complete_trials, is_loaded, load_warning, pareto_front


def _axis(study: optuna.Study) -> tuple[str, str]:
    """(x attribute, label): the second objective if any, else latency."""
    objectives = study.user_attrs.get("objectives", ["proxy_loss"])
    other = [o for o in objectives if o != "proxy_loss"]
    name = other[0] if other else "latency_ms"
    attr = {"latency_ms": "latency_ms_p50", "params": "params", "macs": "macs"}[name]
    label = {"latency_ms": "latency p50 (ms)", "params": "parameters", "macs": "MACs per forward"}[name]
    return attr, label


def plot_pareto(study: optuna.Study, path: Path) -> None:
    trials = complete_trials(study)
    front = {t.number for t in pareto_front(study)}
    attr, label = _axis(study)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [t.user_attrs[attr] for t in trials]
    ys = [t.user_attrs["proxy_loss"] for t in trials]
    ax.scatter(xs, ys, c="#9aa5b1", s=22, label="trials")
    on_front = sorted((t for t in trials if t.number in front), key=lambda t: t.user_attrs[attr])
    if on_front:
        ax.plot(
            [t.user_attrs[attr] for t in on_front],
            [t.user_attrs["proxy_loss"] for t in on_front],
            "o-",
            c="#d1495b",
            ms=6,
            label="Pareto front" if len(study.directions) > 1 else "best",
        )
    for t in trials:
        if "baseline" in t.user_attrs:
            ax.scatter(
                [t.user_attrs[attr]],
                [t.user_attrs["proxy_loss"]],
                marker="*",
                s=220,
                c="#edae49",
                edgecolors="k",
                zorder=5,
            )
            ax.annotate(
                t.user_attrs["baseline"],
                (t.user_attrs[attr], t.user_attrs["proxy_loss"]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
    ax.set_xlabel(label)
    ax.set_ylabel("proxy validation loss")
    ax.set_title(f"{study.study_name}: {len(trials)} completed trials (stars: baselines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _target(study: optuna.Study):
    if len(study.directions) == 1:
        return None, "proxy_loss"
    return (lambda t: t.values[0]), study.user_attrs.get("objectives", ["objective 0"])[0]


def plot_history(study: optuna.Study, path: Path) -> None:
    from optuna.visualization.matplotlib import plot_optimization_history

    target, name = _target(study)
    _save(plot_optimization_history(study, target=target, target_name=name), path)


# Fewer completed trials than this: the importances (Optuna's default evaluator, PED-ANOVA in the
# Optuna 5.1 installed here, which compares the best trials' parameter distribution with all
# trials') are noise, not a finding; the report says so (issue #32).
MIN_IMPORTANCE_TRIALS = 20


def importance_trials(study: optuna.Study) -> int:
    """How many trials the importances rest on: the completed ones (Optuna's evaluators fit only those)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def importance_warning(study: optuna.Study) -> str | None:
    n = importance_trials(study)
    if n >= MIN_IMPORTANCE_TRIALS:
        return None
    return (
        f"parameter importances rest on {n} completed trials (< {MIN_IMPORTANCE_TRIALS}): read them as noise,"
        " not a finding; run more trials before drawing on them"
    )


def plot_importances(study: optuna.Study, path: Path) -> str | None:
    """Returns why it was skipped, or None. The title says how many trials the importances rest on."""
    from optuna.visualization.matplotlib import plot_param_importances

    target, name = _target(study)
    try:
        with warnings.catch_warnings():
            # PED-ANOVA's notes that it ranks for low targets (ours: a loss or a latency, minimised)
            # and that some parameter values have < 2 trials: the title and `importance_warning` say
            # how many trials the importances rest on, in one line instead of one per parameter.
            warnings.filterwarnings("ignore", r"PedAnovaImportanceEvaluator computes", UserWarning)
            warnings.filterwarnings("ignore", r"Some regimes for parameter", UserWarning)
            ax = plot_param_importances(study, target=target, target_name=name)
    except (ValueError, RuntimeError) as exc:  # too few trials, or a single distinct value
        return str(exc).splitlines()[0]
    n = importance_trials(study)
    few = f" - under {MIN_IMPORTANCE_TRIALS}: noise" if n < MIN_IMPORTANCE_TRIALS else ""
    ax.set_title(f"Parameter importances ({name}) from {n} completed trials{few}")
    _save(ax, path)
    return None


def _save(ax, path: Path) -> None:
    """Save the figure of an Optuna matplotlib plot at 6.5 x 4.5 inches, 120 dpi, and close it."""
    fig = ax.figure
    assert isinstance(fig, Figure)  # Optuna draws on a figure of its own, not a subfigure
    fig.set_size_inches(6.5, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_markdown(study: optuna.Study) -> str:
    trials = sorted(complete_trials(study), key=lambda t: t.user_attrs["proxy_loss"])
    front = {t.number for t in pareto_front(study)}
    states = {
        s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    }
    for t in study.get_trials(deepcopy=False):
        if t.state.name in states:
            states[t.state.name] += 1
    lines = [
        f"# Study `{study.study_name}`",
        "",
        f"Space `{study.user_attrs.get('space_file')}`; objectives {', '.join(study.user_attrs.get('objectives', []))}. "
        + ", ".join(f"{n} {s.lower()}" for s, n in states.items())
        + ".",
        "",
    ]
    for warning in (load_warning(study), importance_warning(study)):
        if warning:
            lines += [f"**Warning:** {warning}.", ""]
    lines += [
        "| trial | params | MACs | latency p50 (ms) | x baseline | timed under load | proxy loss | Pareto | baseline |",
        "|---:|---:|---:|---:|---:|:-:|---:|:-:|---|",
    ]
    for t in trials:
        a = t.user_attrs
        ratio = a.get("latency_ratio_rounds")
        busy = f"{a.get('other_cores_busy') or 0:.1f} cores" if is_loaded(t) else ""
        lines.append(
            f"| {t.number} | {a['params']:,} | {a['macs'] / 1e6:,.1f}M | {a['latency_ms_p50']:.2f} | "
            f"{'' if ratio is None else f'{ratio:.3f}'} | {busy} | {a['proxy_loss']:.5f} | "
            f"{'yes' if t.number in front else ''} | {a.get('baseline', '')} |"
        )
    return "\n".join(lines) + "\n"


def write_report(study: optuna.Study, folder: str | Path) -> dict[str, str]:
    """Write the plots and summary.md into `folder`; returns {name: path or 'skipped: why'}, plus
    'warning' (importances on fewer than MIN_IMPORTANCE_TRIALS trials) and 'load' (trials timed
    under load) when they apply: `nas report` prints every entry."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    plot_pareto(study, folder / "pareto.png")
    out["pareto"] = str(folder / "pareto.png")
    plot_history(study, folder / "history.png")
    out["history"] = str(folder / "history.png")
    why = plot_importances(study, folder / "importances.png")
    out["importances"] = f"skipped: {why}" if why else str(folder / "importances.png")
    few = importance_warning(study)
    if few and not why:
        out["warning"] = few
    loaded = load_warning(study)
    if loaded:
        out["load"] = f"warning: {loaded}"
    write_text(folder / "summary.md", summary_markdown(study))
    out["summary"] = str(folder / "summary.md")
    return out
