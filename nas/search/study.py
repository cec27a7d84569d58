"""The Optuna engine: studies in an RDB storage (SQLite file by default), samplers and pruners by
name, baselines enqueued first, failures recorded, killed runs resumed.

Multi-objective studies (e.g. proxy_loss and latency_ms) get a Pareto front but no pruning:
Optuna's `Trial.report` raises in multi-objective studies, so every feasible trial trains its full
proxy budget. Declare one objective (proxy_loss, with a latency or size budget) to prune with
Hyperband or successive halving instead. Budgets reject points before any training either way.

Resume: trials report a heartbeat to the storage; a trial whose process died (SIGKILL, preemption)
goes stale after `GRACE_S` seconds, is marked FAIL and re-enqueued with the same parameters by
Optuna's `RetryHeartbeatStaleTrialCallback`. Rerunning the same command continues until the
requested number of trials has finished; completed trials are never redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError

from nas.config import dump_yaml
from nas.errors import NasError
from nas.search.objective import Hooks, Rejected, check_feasible_space, evaluate_point, proxy_config
from nas.search.settings import SamplerName, SearchSettings
from nas.settings import to_argv
from nas.space import load_arch, load_space, sample_arch
from nas.space.sample import arch_to_params
from nas.space.schema import Space

# Heartbeats, the stale-trial callback and the matplotlib plots are marked experimental in Optuna;
# we rely on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)

HEARTBEAT_S = 5  # seconds between a running trial's heartbeats
GRACE_S = 20  # a trial silent this long belongs to a dead process: failed and retried
MAX_RETRY = 3  # retries of one stale trial


def _tpe(seed: int, multi: bool) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=5)


# name -> sampler factory. One explicit table; an unknown name lists these.
SAMPLERS = {
    "tpe": _tpe,  # default, single and multi-objective (Watanabe 2023)
    "nsga2": lambda seed, multi: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
    "random": lambda seed, multi: optuna.samplers.RandomSampler(seed=seed),  # a strong NAS baseline
}
assert tuple(SAMPLERS) == typing.get_args(SamplerName), "SamplerName must list the SAMPLERS keys"


def make_pruner(name: str, max_steps: int, report_every: int) -> optuna.pruners.BasePruner:
    """Pruners measure resource in optimizer steps (the `step` of each report)."""
    table = {
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=report_every, max_resource=max_steps
        ),
        "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=report_every),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=report_every),
        "none": optuna.pruners.NopPruner,
    }
    return table[name]()


def space_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def open_storage(url: str, heartbeat: bool = True) -> RDBStorage:
    """RDB storage, with heartbeats for `study.optimize` (the Ray engine asks and tells instead);
    an unreachable or malformed URL is a NasError."""
    beat = {}
    if heartbeat:
        beat = dict(
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    for attempt in range(5):
        try:
            return RDBStorage(url, **beat)
        except Exception as exc:  # sqlalchemy raises many types: connection, driver, URL syntax
            # Two processes creating a new storage at once (workers, a dashboard): the loser's
            # schema insert collides; the schema exists a moment later, so try again.
            if isinstance(exc, IntegrityError) and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise NasError(
                f"storage {url}: cannot open ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None


def open_study(settings: SearchSettings, space: Space, storage=None) -> optuna.Study:
    """Create the study or load it; refuse to mix a study with another space."""
    if settings.sampler not in SAMPLERS:
        raise NasError(f"--sampler {settings.sampler}: unknown (allowed: {', '.join(SAMPLERS)})")
    storage = storage or open_storage(settings.storage_url())
    multi = len(space.objectives) > 1
    sampler = SAMPLERS[settings.sampler](settings.seed, multi)
    proxy = space.proxy
    pruner = (
        optuna.pruners.NopPruner() if multi else make_pruner(proxy.pruner, proxy.steps, proxy.report_every)
    )
    digest = space_digest(settings.space)
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if settings.study in names:
        study = optuna.load_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner)
        theirs = study.user_attrs.get("space_digest")
        if theirs != digest:
            raise NasError(
                f"study {settings.study} exists in {settings.storage_url()} with another space"
                f" ({study.user_attrs.get('space_file')}, digest {theirs}); use another --study name"
            )
        return study
    directions = [o.direction for o in space.objectives]
    study = optuna.create_study(
        study_name=settings.study, storage=storage, directions=directions, sampler=sampler, pruner=pruner
    )
    study.set_user_attr("space_file", str(settings.space))
    study.set_user_attr("space_digest", digest)
    study.set_user_attr("space", space.model_dump(mode="json"))
    study.set_user_attr("objectives", [o.metric for o in space.objectives])
    for rel in space.baselines:
        path = Path(settings.space).parent / rel
        arch = load_arch(path)
        study.enqueue_trial(
            arch_to_params(space, arch, str(path)), user_attrs={"baseline": arch.name}, skip_if_exists=True
        )
    return study


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials started on this host by a process that no longer exists (a SIGKILLed
    search): fail them now and re-enqueue their parameters, instead of waiting GRACE_S for the
    heartbeat to go stale. Trials of live or remote workers are left to the heartbeat."""
    host = socket.gethostname()
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                retry(study, study._storage.get_trial(trial._trial_id))
                failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process got there first
    return failed


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished trials that count toward --trials: a FAIL without an `error` attribute is a trial
    whose process died (it is retried), not a failure of the architecture."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def finished(study: optuna.Study) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def make_objective(study: optuna.Study, space: Space, settings: SearchSettings, cache, train_config):
    import torch

    multi = len(space.objectives) > 1
    zc = space.proxy.zero_cost

    def objective(trial: optuna.Trial):
        def record(values: dict[str, Any]) -> None:
            for key, value in values.items():
                trial.set_user_attr(key, value)

        def report(step: int, loss: float) -> None:
            trial.set_user_attr("last_step", step)
            if multi:
                return  # Optuna cannot prune multi-objective studies
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (proxy_loss {loss:.4f})")

        def zero_cost_history() -> list[float]:
            key = f"zero_cost_{zc.proxy}"
            return [
                t.user_attrs[key]
                for t in study.get_trials(deepcopy=False)
                if key in t.user_attrs and t.number != trial.number
            ]

        trial.set_user_attr("worker", _worker_id())
        try:
            arch = sample_arch(space, trial, name=f"{settings.study}-t{trial.number}")
            trial.set_user_attr("arch", arch.to_data())
            result = evaluate_point(
                space, arch, cache, train_config, Hooks(record, report, zero_cost_history)
            )
        except Rejected as rejected:
            record({"rejected": rejected.kind, "reason": rejected.reason})
            raise optuna.TrialPruned(rejected.reason) from None
        except optuna.TrialPruned as pruned:
            record({"reason": str(pruned)})
            raise
        except (Exception, torch.OutOfMemoryError) as exc:  # recorded, the study goes on
            record({"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            raise
        return tuple(result.values) if multi else result.values[0]

    return objective


def trial_line(trial: optuna.trial.FrozenTrial) -> str:
    """One line per finished trial: number, params, MACs, latency, score, state."""
    a = trial.user_attrs
    params = f"{a['params'] / 1e6:.3f}M" if "params" in a else "-"
    macs = f"{a['macs'] / 1e9:.3f}G" if "macs" in a else "-"
    latency = f"{a['latency_ms_p50']:.2f}ms" if "latency_ms_p50" in a else "-"
    score = f"{a['proxy_loss']:.4f}" if "proxy_loss" in a else "-"
    note = a.get("reason") or a.get("error") or ("baseline " + a["baseline"] if "baseline" in a else "")
    return (
        f"trial {trial.number:>4}  params {params:>9}  MACs {macs:>9}  latency {latency:>9}  "
        f"proxy_loss {score:>7}  {trial.state.name:<8} {note}".rstrip()
    )


def write_metadata(settings: SearchSettings, space: Space) -> None:
    """results/<study>/: the resolved space, the settings, the environment."""
    import platform

    import torch

    folder = settings.folder
    folder.mkdir(parents=True, exist_ok=True)
    dump_yaml(space, folder / "space.yaml")
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (folder / "search.json").write_text(
        json.dumps(
            {"settings": settings.model_dump(mode="json", exclude={"dry_run"}), "environment": env}, indent=2
        )
    )


def _check_cache(space: Space, cache, cache_path: str) -> None:
    from nas.train.loop import check_arch_cache

    sample = sample_arch(space, _FirstChoice())  # settings are shared by every point
    check_arch_cache(sample, cache.manifest, f"space {space.name}", cache_path)


class _FirstChoice:
    def suggest_int(self, name, low, high):
        return low

    def suggest_categorical(self, name, choices):
        return choices[0]


def run_search(settings: SearchSettings, quiet: bool = False) -> optuna.Study:
    """`nas search`: run (or resume) the study until `settings.trials` trials have finished."""
    from tqdm.auto import tqdm

    from nas.data.cache import open_cache

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    if settings.trials < 1:
        raise NasError(f"--trials must be >= 1, got {settings.trials}")
    if settings.workers < 1:
        raise NasError(f"--workers must be >= 1, got {settings.workers}")
    space = load_space(settings.space)
    if settings.cache is None:
        raise NasError("no latent cache: pass --cache CACHE (made by `nas precompute`)")
    cache = open_cache(settings.cache)
    _check_cache(space, cache, settings.cache)
    train_config = proxy_config(space, settings.space)
    check_feasible_space(space)
    settings.folder.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, space)
    write_metadata(settings, space)

    children = []
    for rank in range(1, settings.workers):  # extra local workers share the storage
        child = settings.model_copy(
            update={"storage": settings.storage_url(), "seed": settings.seed + rank, "workers": 1}
        )
        cmd = [sys.executable, "-m", "nas", *to_argv(child), "--quiet"]
        children.append(subprocess.Popen(cmd))

    retried = fail_dead_local_trials(study)
    if retried and not quiet:
        print(
            f"study {settings.study}: trials {retried} were left running by a dead process; failed and retried"
        )
    objective = make_objective(study, space, settings, cache, train_config)
    done = finished(study)
    bar = tqdm(
        total=settings.trials,
        initial=min(done, settings.trials),
        desc=f"study {settings.study}",
        unit="trial",
        disable=quiet,
    )

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not quiet:
            bar.write(trial_line(trial))
        bar.n = min(finished(study), settings.trials)
        bar.refresh()

    while finished(study) < settings.trials:
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            callbacks=[on_trial],
            gc_after_trial=True,
            show_progress_bar=False,
        )
    bar.close()
    for child in children:
        child.wait()
    export_trials_csv(study, settings.folder / "trials.csv")
    return study


def export_trials_csv(study: optuna.Study, path: Path) -> None:
    frame = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
    frame.to_csv(path, index=False)


def load_study(study_name: str, storage: str | None = None, results: str = "results") -> optuna.Study:
    """Open an existing study for export and report (NasError if absent)."""
    url = storage or f"sqlite:///{(Path(results) / study_name / 'study.db').resolve()}"
    if storage is None and not (Path(results) / study_name / "study.db").is_file():
        raise NasError(
            f"study {study_name}: no {Path(results) / study_name / 'study.db'}; pass --storage URL"
        )
    store = open_storage(url, heartbeat=False)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if study_name not in names:
        raise NasError(f"study {study_name}: not in {url} (studies there: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=store)
