"""The one objective both engines run: architecture -> cost -> budgets -> (zero-cost) -> proxy
training -> objective values. Engine-free: Optuna and Ray adapt it in study.py / ray_backend.py
through the `Hooks` it calls."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.space.schema import Arch, Space

# Metric name in objectives/budgets -> key in the metrics dict.
METRIC_KEYS = {"proxy_loss": "proxy_loss", "latency_ms": "latency_ms_p50", "params": "params", "macs": "macs"}


class Rejected(Exception):
    """The point is skipped before training (over a budget, or cut by the zero-cost filter)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass
class Hooks:
    """How an engine listens: `metrics` receives every figure as soon as it exists (trial
    attributes), `report(step, proxy_loss)` may stop or prune (return True / raise), and
    `zero_cost_history()` gives the scores of earlier trials for the pre-filter."""

    metrics: Callable[[dict[str, Any]], None] = lambda m: None
    report: Callable[[int, float], bool | None] = lambda step, loss: None
    zero_cost_history: Callable[[], list[float]] = list
    # where a proxy config with `report_to` logs each trial's run (results/<study>/tracking/)
    tracking: Path | None = None


def proxy_config(space: Space, space_path: str | Path | None = None):
    """The training config of the proxy runs: the recipe preset or file, plus the space's overrides."""
    from nas.core.config import validate
    from nas.train.config import TrainConfig, read_config_data

    recipe = space.proxy.recipe
    if recipe.endswith((".yaml", ".yml")) and space_path is not None and not Path(recipe).is_absolute():
        recipe = str(Path(space_path).parent / recipe)
    data, source = read_config_data(recipe)
    for key, value in space.proxy.overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    if space.proxy.distill is not None:  # the space's, its teacher relative to the space file
        from nas.search.teacher import resolve_teacher_path

        teacher = str(resolve_teacher_path(space, space_path))
        data["distill"] = {**space.proxy.distill.model_dump(), "teacher": teacher}
    return validate(TrainConfig, data, f"{space_path or space.name}: proxy ({source} + overrides)")


def measure_cost(space: Space, arch: Arch) -> dict[str, Any]:
    """Parameters and MACs (meta device), then latency (and peak memory) as the space says:
    predicted from `latency.table` (`prepare_latency`), or measured whole on `latency.device`:
    beside the space's first baseline (`latency.reference: baseline`, `measure_relative`) or alone."""
    from nas.cost.measure import BUSY_CORES_WARN, arch_cost, measure_setup
    from nas.space import build_unet

    cost = arch_cost(arch, batch=space.latency.batch)
    out = {k: cost[k] for k in ("params", "macs", "attention_macs", "model_class")}
    lat = space.latency
    out["batch"] = lat.batch  # MACs and latency are per U-Net call on this many latents
    if lat.source == "table":  # predicted: no forward pass, deterministic, immune to load
        from nas.cost.table import table_cost

        out.update(table_cost(space, arch))
        return out
    reference = baseline_reference(space)
    if reference is None:
        measured = measure_setup(build_unet(arch), arch, lat)
        out.update(latency_ms_p50=measured.latency_ms_p50, latency_ms_p90=measured.latency_ms_p90)
        out["peak_memory_mb"] = measured.peak_memory_mb
        out["other_cores_busy"] = measured.other_cores_busy
        out["latency_mode"] = "alone"
    else:
        out.update(measure_relative(space, arch, reference))
    # more than BUSY_CORES_WARN cores of other processes: the times likely read high (the card,
    # the summary and `nas export` name such trials)
    out["latency_loaded"] = out["other_cores_busy"] > BUSY_CORES_WARN
    out["latency_source"] = "measure"
    out["latency_device"] = _device_name(lat.device)
    return out


@dataclass
class Reference:
    """The space's first baseline, built and made ready to time once per process, and the time
    (ms) that ratios to it are reported in: `latency.reference_ms`, else the baseline's median in
    the first pair this process times (for a study's first worker: the baseline trial's own, as
    the baselines are enqueued first)."""

    forward: Any  # nas.cost.measure.Forward of the baseline
    name: str
    ms: float | None
    # "space" (latency.reference_ms), "shared" (fixed by `nas search` from the file shared under
    # --results, `shared_reference`) or "measured" (the first pair of this process)
    source: str
    other_cores_busy: float | None = None  # during the pair that fixed `ms` (source measured)


_REFERENCES: dict[str, Reference] = {}  # per process: (baseline file, latency setup) -> Reference


def baseline_reference(space: Space) -> Reference | None:
    """The Reference of `space` under `latency.reference: baseline`, None if it has no baselines
    or times trials alone. `baselines[0]` must be a path that exists from here (prepare_search
    resolves it against the space file)."""
    from nas.cost.measure import Forward, setup_kwargs
    from nas.space import build_unet, load_arch

    lat = space.latency
    if lat.source != "measure" or lat.reference != "baseline" or not space.baselines:
        return None
    path = Path(space.baselines[0])
    key = json.dumps([str(path.resolve()), lat.model_dump(mode="json")], sort_keys=True)
    if key not in _REFERENCES:
        if not path.is_file():
            raise NasError(
                f"space {space.name}: baselines[0] {path} not found (latency.reference: baseline times"
                " every trial beside it; paths are relative to the space file; reference: none times trials alone)"
            )
        arch = load_arch(path)
        forward = Forward(build_unet(arch), arch, **setup_kwargs(lat))
        source = "measured" if lat.reference_ms is None else "shared" if lat.reference_from else "space"
        busy = None  # load while a shared reference was timed (in its file)
        if source == "shared" and lat.reference_from and Path(lat.reference_from).is_file():
            busy = json.loads(Path(lat.reference_from).read_text()).get("other_cores_busy")
        _REFERENCES[key] = Reference(forward, arch.name, lat.reference_ms, source, busy)
    return _REFERENCES[key]


def measure_relative(space: Space, arch: Arch, reference: Reference) -> dict[str, Any]:
    """Time `arch` in alternation with the baseline (nas.cost.relative.measure_pair) and report
    latency = per-round ratio median x the reference time, p90 = per-round ratio p90 x it."""
    from nas.cost.measure import Forward, setup_kwargs
    from nas.cost.relative import measure_pair
    from nas.space import build_unet

    lat = space.latency
    pair = measure_pair(
        Forward(build_unet(arch), arch, **setup_kwargs(lat)), reference.forward, lat.warmup, lat.iters
    )
    if reference.ms is None:  # the first pair of this process fixes the reference for good
        reference.ms = pair.reference.latency_ms_p50
        reference.other_cores_busy = pair.other_cores_busy
    return {
        "latency_ms_p50": pair.ratio_rounds * reference.ms,
        "latency_ms_p90": pair.ratio_rounds_p90 * reference.ms,
        "peak_memory_mb": pair.candidate.peak_memory_mb,  # both networks' on CPU (process peak RSS)
        "other_cores_busy": pair.other_cores_busy,
        "latency_mode": "relative",
        "latency_ratio": pair.ratio,  # candidate median / baseline median, same rounds
        "latency_ratio_rounds": pair.ratio_rounds,  # median of per-round ratios (what is reported)
        "latency_baseline": reference.name,
        "latency_reference_ms": reference.ms,
        "latency_reference_source": reference.source,
        "latency_reference_from": space.latency.reference_from,  # the shared file (source shared)
        "latency_reference_cores_busy": reference.other_cores_busy,  # None: from the space
        "latency_measured_ms_p50": pair.candidate.latency_ms_p50,  # the candidate's own time, load included
        "latency_baseline_ms_p50": pair.reference.latency_ms_p50,  # the baseline's in the same rounds
    }


def _device_name(device: str) -> str:
    """GPU name or CPU model the latency was measured on (card, trial attributes)."""
    from nas.core.runfolder import environment

    env = environment(device=device)
    return env.get("device_name") or env["cpu"]


def over_budget(space: Space, metrics: dict[str, Any]) -> str | None:
    """'params 1.2e6 > 1e6'-style reason for the first budget exceeded, or None."""
    for name, limit in space.budgets.model_dump(exclude_none=True).items():
        value = metrics.get(METRIC_KEYS[name])
        if value is not None and value > limit:
            return f"{name} {value:.4g} > budget {limit:.4g}"
    return None


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class PointResult:
    metrics: dict[str, Any]
    values: list[float] = field(default_factory=list)  # one per objective, in the space's order


def evaluate_point(
    space: Space,
    arch: Arch,
    cache,
    train_config,
    hooks: Hooks,
    measure: Callable[[Space, Arch], dict[str, Any]] = measure_cost,
) -> PointResult:
    """Score one architecture. Raises Rejected before training for an infeasible point.
    `measure` gives the cost figures (Ray passes one that runs on a chosen accelerator type)."""
    from nas.train.loop import proxy_train

    started = time.perf_counter()
    metrics: dict[str, Any] = {"arch_name": arch.name}
    metrics.update(measure(space, arch))
    hooks.metrics(metrics)
    reason = over_budget(space, metrics)
    if reason:
        raise Rejected("budget", reason)

    zc = space.proxy.zero_cost
    if zc is not None:
        from nas.search.proxies import zero_cost_score

        score = zero_cost_score(zc.proxy, arch, cache, train_config, zc.batch_size, space.proxy.seed)
        history = hooks.zero_cost_history()
        metrics[f"zero_cost_{zc.proxy}"] = score
        hooks.metrics({f"zero_cost_{zc.proxy}": score})
        if zc.prune_below_quantile > 0 and len(history) >= zc.warmup_trials:
            cut = quantile(history, zc.prune_below_quantile)
            if score < cut:
                raise Rejected(
                    "zero_cost", f"{zc.proxy} {score:.4g} < q{zc.prune_below_quantile:g} {cut:.4g}"
                )

    proxy = space.proxy
    teacher = None
    if train_config.distill is not None:  # loaded by the first trial of this process, then kept
        from nas.search.teacher import cached_teacher

        teacher = cached_teacher(train_config.distill.teacher)

    def record(values: dict[str, Any]) -> None:  # inheritance counts, distillation timings
        metrics.update(values)
        hooks.metrics(values)

    loss = proxy_train(
        arch,
        cache,
        proxy.steps,
        report=hooks.report,
        every=proxy.report_every,
        config=train_config,
        seed=proxy.seed,
        teacher=teacher,
        record=record,
        tracking=hooks.tracking,
    )
    if loss is None or not math.isfinite(loss):
        raise NasError(f"architecture {arch.name}: proxy validation loss is {loss}")
    metrics["proxy_loss"] = float(loss)
    metrics["proxy_seconds"] = time.perf_counter() - started
    hooks.metrics({"proxy_loss": metrics["proxy_loss"], "proxy_seconds": metrics["proxy_seconds"]})
    values = [float(metrics[METRIC_KEYS[o.metric]]) for o in space.objectives]
    return PointResult(metrics, values)


def check_feasible_space(space: Space) -> None:
    """Refuse a space whose budgets exclude every point, before any trial: the smallest point of
    each depth (every cost grows with every choice) must fit the parameter and MAC budgets, and
    its measured latency the latency budget."""
    from nas.cost.measure import arch_cost
    from nas.space import extreme_archs

    b = space.budgets
    if b.params is None and b.macs is None and b.latency_ms is None:
        return
    best: dict[str, float] = {}
    for _, smallest, _ in extreme_archs(space):
        cost = arch_cost(smallest, batch=space.latency.batch)
        best["params"] = min(best.get("params", math.inf), cost["params"])
        best["macs"] = min(best.get("macs", math.inf), cost["macs"])
        if b.latency_ms is not None and cost["params"] <= (b.params or math.inf):
            best["latency_ms_p50"] = min(
                best.get("latency_ms_p50", math.inf), measure_cost(space, smallest)["latency_ms_p50"]
            )
    reason = over_budget(space, best)
    if reason:
        raise NasError(f"space {space.name}: budgets exclude every architecture (smallest point: {reason})")


@dataclass
class PreparedSearch:
    """What both engines need before the first trial (`prepare_search`)."""

    space: Space  # with the latency table and the teacher's settings resolved
    cache: Any  # nas.data.cache.LatentCache, checked against the space
    train_config: Any  # the proxy runs' TrainConfig


def prepare_search(
    space_path: str | Path, cache_path: str | None, teacher: str | None, results: str | Path | None = None
) -> PreparedSearch:
    """Load and check everything a search reads before any trial or storage is touched: the space,
    the latent cache (its shapes against the space's settings), the latency table (`source: table`),
    the teacher's config (`--teacher`), the proxy training config, and that some point fits the budgets.
    `results`: the --results folder, whose shared latency reference every study there uses
    (`shared_reference`; None: each process fixes its own)."""
    from nas.cost.table import prepare_latency
    from nas.data.cache import open_cache
    from nas.search.teacher import prepare_distill
    from nas.space import load_space

    space = load_space(space_path)
    if cache_path is None:
        raise NasError("no latent cache: pass --cache CACHE (made by `nas precompute`)")
    cache = open_cache(cache_path)
    check_cache(space, cache, cache_path)
    space = prepare_latency(space, space_path)  # source: table: load and check it first
    space = resolve_baselines(space, space_path)  # source: measure times trials beside the first
    space = prepare_distill(space, space_path, teacher)  # the teacher's config only
    train_config = proxy_config(space, space_path)
    check_feasible_space(space)
    if results is not None:  # after every check: a refused search writes nothing
        space = shared_reference(space, Path(results))
    baseline_reference(space)  # built once here: a missing baseline file is refused before any trial
    return PreparedSearch(space, cache, train_config)


# Under each --results folder, one reference time per (baseline, latency setup, machine), fixed by
# the first study that needs it and read by every later one, so that latencies of studies compare
# without setting latency.reference_ms (results/relative_latency: a fixed reference kept 5 of 5
# U-Nets within +-10.3% across 4 loaded studies at 15 rounds; each study's own reference: 58%).
SHARED_REFERENCES = ".latency_reference"


def shared_reference(space: Space, results: Path) -> Space:
    """`space` with latency.reference_ms fixed from results/.latency_reference/<key>.json, timing the
    baseline alone (`latency.warmup` + `latency.iters` forwards) and writing the file if this is the
    first study there. Unchanged without `reference: baseline` and baselines, or with reference_ms set."""
    import hashlib
    import os
    import socket

    import torch

    from nas.core.runfolder import read_json, write_json
    from nas.cost.measure import measure_setup
    from nas.space import build_unet, load_arch
    from nas.space.sample import canonical

    lat = space.latency
    if lat.source != "measure" or lat.reference != "baseline" or not space.baselines or lat.reference_ms:
        return space
    path = Path(space.baselines[0])
    if not path.is_file():
        return space  # baseline_reference names the missing file
    arch = load_arch(path)
    key = {
        "baseline": canonical(arch),
        "latency": lat.model_dump(mode="json", exclude={"reference_ms", "reference_from"}),
        "machine": _device_name(lat.device),
        "host": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = results / SHARED_REFERENCES / f"{arch.name}-{digest}.json"
    if not file.is_file():
        latency = measure_setup(build_unet(arch), arch, lat)  # warns when other processes load the CPU
        record = {**key, "reference_ms": latency.latency_ms_p50, "rounds": lat.iters,
                  "other_cores_busy": latency.other_cores_busy, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        file.parent.mkdir(parents=True, exist_ok=True)
        staging = file.with_name(f".{file.name}.{os.getpid()}")
        write_json(staging, record)
        try:
            os.link(staging, file)  # the first study to finish timing wins; the others read its file
        except FileExistsError:
            pass
        finally:
            staging.unlink()
    data = read_json(file)
    latency_setup = lat.model_copy(update={"reference_ms": data["reference_ms"], "reference_from": str(file)})
    return space.model_copy(update={"latency": latency_setup})


def resolve_baselines(space: Space, space_path: str | Path) -> Space:
    """The space with its `baselines:` resolved against the space file (as `latency.table` is), so
    that `measure_cost` finds the first wherever it runs; an absolute path stays as it is."""
    base = Path(space_path).parent
    return space.model_copy(update={"baselines": [str((base / rel).resolve()) for rel in space.baselines]})


def check_cache(space: Space, cache, cache_path: str) -> None:
    """The cache's latents and text fit the space (settings are shared by every point of a space)."""
    from nas.space import sample_arch
    from nas.train.loop import check_arch_cache

    sample = sample_arch(space, _FirstChoice())
    check_arch_cache(sample, cache.manifest, f"space {space.name}", cache_path)


class _FirstChoice:
    """A trial stand-in that takes the first choice of every parameter."""

    def suggest_int(self, name, low, high):
        return low

    def suggest_categorical(self, name, choices):
        return choices[0]
