"""Pick an architecture from a finished study and write it out: the architecture YAML, the U-Net
`config.json` diffusers loads with `from_config` (with the class's code, flex_unet.py, for a
FlexUNet: `AutoModel.from_config(DIR, trust_remote_code=True)` needs no `nas`), and a card with its
figures."""

from __future__ import annotations

import math
import operator
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from nas.core.errors import NasError
from nas.core.runfolder import write_json, write_text, write_yaml
from nas.cost.measure import BUSY_CORES_WARN
from nas.models import ship_code
from nas.space import arch_from_dict, build_unet, unet_config

# Heartbeats, the stale-trial callback and the matplotlib plots are marked experimental in Optuna;
# we rely on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

# Names usable in --pick expressions -> trial user attribute.
FIELDS = {
    "proxy_loss": "proxy_loss",
    "latency_ms": "latency_ms_p50",
    "latency_ms_p90": "latency_ms_p90",
    "params": "params",
    "macs": "macs",
    "attention_macs": "attention_macs",
    "peak_memory_mb": "peak_memory_mb",
}
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}
# FIELD OP NUMBER, or FIELD OP NUMBER*baseline: relative to the (first) baseline trial's value
_CONDITION = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)\s*(\*\s*baseline)?\s*$")


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "proxy_loss" in t.user_attrs
    ]
    if not trials:
        raise NasError(f"study {study.study_name}: no completed trial yet (run nas search first)")
    return trials


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Non-dominated completed trials (the best trial for a single objective)."""
    if len(study.directions) == 1:
        return [study.best_trial]
    return study.best_trials


def parse_conditions(expr: str) -> list[tuple[str, Any, float, bool]]:
    """'latency_ms<=12, params<0.5*baseline' -> [(attr, op, value, relative), ...] (NasError on a
    malformed part); relative values are multiples of the baseline trial's."""
    out = []
    for part in re.split(r",|\band\b", expr):
        match = _CONDITION.match(part)
        if not match or match.group(1) not in FIELDS:
            raise NasError(
                f"--pick {expr!r}: cannot read {part.strip()!r} (use best, knee, or FIELD OP NUMBER[*baseline] with FIELD in"
                f" {', '.join(FIELDS)} and OP in {', '.join(OPS)}, joined by ',')"
            )
        try:
            value = float(match.group(3))
        except ValueError:
            raise NasError(f"--pick {expr!r}: {match.group(3)!r} is not a number") from None
        out.append((FIELDS[match.group(1)], OPS[match.group(2)], value, bool(match.group(4))))
    return out


def _knee(study: optuna.Study, front: list[FrozenTrial]) -> FrozenTrial:
    """The front point closest to the ideal point once each objective is scaled to [0, 1]. Ties (any
    2-point front: both ends lie at distance 1) go to the point whose objectives are the smaller
    multiples of the front's best values (log ratios summed): 10% more loss for half the latency
    wins over the reverse."""
    if len(front) == 1:
        return front[0]
    dims = len(study.directions)
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in study.directions]
    lows = [min(signs[i] * t.values[i] for t in front) for i in range(dims)]
    highs = [max(signs[i] * t.values[i] for t in front) for i in range(dims)]

    def distance(t: FrozenTrial) -> float:
        return math.sqrt(
            sum(((signs[i] * t.values[i] - lows[i]) / ((highs[i] - lows[i]) or 1)) ** 2 for i in range(dims))
        )

    def relative(t: FrozenTrial) -> float:
        values = [signs[i] * t.values[i] for i in range(dims)]
        if min(lows) <= 0:  # ratios need positive objectives (loss, ms, MACs are)
            return 0.0
        return sum(math.log(values[i] / lows[i]) for i in range(dims))

    return min(front, key=lambda t: (round(distance(t), 9), relative(t)))


def pick_trial(study: optuna.Study, how: str = "best") -> FrozenTrial:
    """best: lowest proxy loss; knee: balanced Pareto point; EXPR: lowest proxy loss under constraints."""
    trials = complete_trials(study)
    if how == "best":
        return min(trials, key=lambda t: t.user_attrs["proxy_loss"])
    if how == "knee":
        return _knee(study, pareto_front(study))
    conditions = []
    for attr, op, value, relative in parse_conditions(how):
        if relative:
            base = [t for t in trials if "baseline" in t.user_attrs and attr in t.user_attrs]
            if not base:
                raise NasError(
                    f"--pick {how!r}: '*baseline' needs a completed baseline trial (baselines: in the space)"
                )
            value *= min(base, key=lambda t: t.number).user_attrs[attr]
        conditions.append((attr, op, value))
    ok = [
        t
        for t in trials
        if all(attr in t.user_attrs and op(t.user_attrs[attr], v) for attr, op, v in conditions)
    ]
    if not ok:
        ranges = ", ".join(
            f"{name} {min(t.user_attrs.get(attr, math.inf) for t in trials):.4g}..{max(t.user_attrs.get(attr, -math.inf) for t in trials):.4g}"
            for name, attr in FIELDS.items()
            if any(attr == c[0] for c in conditions)
        )
        raise NasError(f"--pick {how!r}: no completed trial satisfies it (completed trials span {ranges})")
    return min(ok, key=lambda t: t.user_attrs["proxy_loss"])


def _latency_source(card: dict[str, Any]) -> str:
    device = card["latency_device"] or "unknown device"
    if card["latency_source"] == "table":
        return f"predicted from latency table `{Path(card['latency_table'] or '').name}` measured on {device}"
    if card.get("latency_mode") == "relative":
        source = card["latency_reference_source"]
        where = {
            "space": "latency.reference_ms of the space",
            "shared": "the baseline timed alone by the first study under this results folder:"
            f" {Path(card.get('latency_reference_from') or '').name}, shared by every study there",
        }.get(source, "the baseline's first time measured in the search process")
        busy = card.get("latency_reference_cores_busy") or 0.0
        fix = (
            f"delete {card.get('latency_reference_from')} to time it again on a quiet machine"
            if source == "shared"
            else "set latency.reference_ms to compare studies"
        )
        loaded = (
            f"; that time was taken while other processes kept {busy:.1f} CPU cores busy, and every latency"
            f" of the study scales with it: {fix}"
            if busy > BUSY_CORES_WARN
            else ""
        )
        return (
            f"measured whole on {device} in alternation with baseline `{card['latency_baseline']}`:"
            f" {card['latency_ratio_rounds']:.3f} x its reference {card['latency_reference_ms']:.2f} ms"
            f" ({where}){loaded}"
        )
    return f"measured whole on {device}"


def is_loaded(trial: FrozenTrial) -> bool:
    """Was the trial's latency measured while other processes kept more than BUSY_CORES_WARN CPU
    cores busy? (Trials of studies older than the `latency_loaded` attribute: from other_cores_busy.)"""
    a = trial.user_attrs
    if "latency_loaded" in a:
        return bool(a["latency_loaded"])
    return (
        a.get("latency_source", "measure") == "measure" and (a.get("other_cores_busy") or 0) > BUSY_CORES_WARN
    )


def load_warning(study: optuna.Study) -> str | None:
    """One line naming the completed trials timed under load, or None when there are none."""
    trials = complete_trials(study)
    loaded = [t for t in trials if is_loaded(t)]
    if not loaded:
        return None
    most = max(t.user_attrs.get("other_cores_busy") or 0 for t in loaded)
    relative = all(t.user_attrs.get("latency_mode") == "relative" for t in loaded)
    return (
        f"study {study.study_name}: trials {', '.join(str(t.number) for t in loaded)} ({len(loaded)} of"
        f" {len(trials)} completed) were timed while other processes kept CPU cores busy (up to {most:.1f});"
        + (
            " their latency is a ratio to the baseline timed in the same rounds, which load shifts far less than times"
            if relative
            else " their latency likely reads high"
        )
        + "; time on a quiet machine, or use latency: {source: table} (docs/cost.md)"
    )


def export_trial(study: optuna.Study, trial: FrozenTrial, out: str | Path, how: str) -> dict[str, Any]:
    """Write OUT/arch.yaml, OUT/config.json (diffusers U-Net config) and OUT/card.{json,md}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = arch_from_dict(trial.user_attrs["arch"], f"study {study.study_name} trial {trial.number}")
    write_yaml(out / "arch.yaml", arch)
    class_name, _ = unet_config(arch)
    model = build_unet(arch, device="meta")
    model.save_config(out)  # config.json with _class_name, as diffusers writes it
    code = ship_code(type(model), out)  # OUT/flex_unet.py for a FlexUNet (config.json's auto_map names it)
    a = trial.user_attrs
    front = {t.number for t in pareto_front(study)}
    card = {
        "study": study.study_name,
        "space": study.user_attrs.get("space_file"),
        "trial": trial.number,
        "pick": how,
        "on_pareto_front": trial.number in front,
        "baseline": a.get("baseline"),
        "model_class": class_name,
        "params": a.get("params"),
        "macs": a.get("macs"),
        "batch": a.get("batch"),  # of the MACs and latency figures (the space's latency batch)
        "attention_macs": a.get("attention_macs"),
        "latency_ms_p50": a.get("latency_ms_p50"),
        "latency_ms_p90": a.get("latency_ms_p90"),
        # "measure": timed whole on the trial's machine; "table": predicted from a per-device table
        "latency_source": a.get("latency_source", "measure"),
        "latency_device": a.get("latency_device"),
        "latency_table": a.get("latency_table"),
        # source measure: "relative" (timed beside the baseline, latency = ratio x reference) or "alone"
        "latency_mode": a.get(
            "latency_mode", "alone" if a.get("latency_source", "measure") == "measure" else None
        ),
        "latency_ratio": a.get("latency_ratio"),  # candidate median / baseline median
        "latency_ratio_rounds": a.get("latency_ratio_rounds"),  # median of per-round ratios (reported)
        "latency_baseline": a.get("latency_baseline"),
        "latency_reference_ms": a.get("latency_reference_ms"),
        "latency_reference_from": a.get("latency_reference_from"),
        "latency_reference_source": a.get("latency_reference_source"),
        "latency_reference_cores_busy": a.get("latency_reference_cores_busy"),  # None: from the space
        "other_cores_busy": a.get("other_cores_busy"),  # while this trial was timed (CPU)
        "latency_loaded": is_loaded(trial),
        "loaded_trials": [t.number for t in complete_trials(study) if is_loaded(t)],
        "load_warning": load_warning(study),
        "proxy_loss": a.get("proxy_loss"),
        "objectives": dict(zip(study.user_attrs.get("objectives", []), trial.values or [])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(out / "card.json", card)
    per_batch = f" of {card['batch']} latents" if card["batch"] else ""
    lines = [
        f"# {arch.name}",
        "",
        f"Picked `{how}` from study `{card['study']}` (space `{card['space']}`), trial {trial.number}"
        + (" (on the Pareto front)" if card["on_pareto_front"] else "")
        + f", {card['date']}.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| model class | `{class_name}` |",
        f"| parameters | {card['params']:,} |",
        f"| MACs per forward{per_batch} (attention included) | {card['macs']:,} |",
        f"| attention MACs | {card['attention_macs']:,} |",
        f"| latency p50 / p90 | {card['latency_ms_p50']:.2f} / {card['latency_ms_p90']:.2f} ms |",
        f"| latency source | {_latency_source(card)} |",
        f"| proxy validation loss | {card['proxy_loss']:.5f} |",
        "",
    ]
    if card["latency_loaded"]:
        lines += [
            f"**This trial was timed while other processes kept {card['other_cores_busy'] or 0:.1f} CPU cores busy.**",
            "",
        ]
    if card["load_warning"]:
        lines += [f"Warning: {card['load_warning']}.", ""]
    lines += [
        (
            f"Load: `diffusers.AutoModel.from_config(DIR, trust_remote_code=True)` (the class's code is "
            f"`DIR/{code}.py`; no `nas` needed)"
            if code
            else "Load: `diffusers.UNet2DConditionModel.from_config(DIR)`"
        )
        + "; train it with `nas train CONFIG --arch DIR/arch.yaml`.",
    ]
    write_text(out / "card.md", "\n".join(lines) + "\n")
    if card["load_warning"]:  # beside the command's summary line: the pick rests on these figures
        print(f"warning: {card['load_warning']}", file=sys.stderr)
    return card
