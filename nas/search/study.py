"""The Optuna engine: studies in an RDB storage (SQLite file by default), samplers and pruners by
name, baselines enqueued first, failures recorded, killed runs resumed.

Multi-objective studies (e.g. proxy_loss and latency_ms) get a Pareto front but no pruning:
Optuna's `Trial.report` raises in multi-objective studies, so every feasible trial trains its full
proxy budget. Declare one objective (proxy_loss, with a latency or size budget) to prune with
Hyperband or successive halving instead. Budgets reject points before any training either way.

Resume: trials report a heartbeat to the storage; a trial whose process died (SIGKILL, preemption)
goes stale after `GRACE_S` seconds (at once if its process was on this host and is gone) and is
marked FAIL. It is re-enqueued with exactly its parameters if its architecture had been chosen
completely (the `arch` attribute is written right after sampling); a trial lost while still
choosing (define-by-run: some parameters set, others not) holds no architecture, so it is not
retried and the sampler draws a new point. Rerunning the same command continues until the
requested number of trials has finished; completed trials are never redone.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas.core.errors import NasError
from nas.core.settings import to_argv
from nas.search.objective import Hooks, Rejected, evaluate_point, prepare_search
from nas.search.settings import SearchSettings
from nas.search.storage import (
    HEARTBEAT_S,
    counted,
    fail_dead_local_trials,
    fail_stale_trials,
    finished,
    open_storage,
    open_study,
    progress,
    worker_id,
    write_metadata,
)
from nas.space import sample_arch
from nas.space.schema import Space

# Heartbeats, the stale-trial callback and the matplotlib plots are marked experimental in Optuna;
# we rely on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)


class Surplus(Exception):
    """This trial would exceed --trials: workers that started at the same moment all saw room for
    one more. The later trial number gives way (recorded as FAIL without `error`: not counted)."""


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
            # The last report comes after the whole proxy budget: pruning it (Hyperband's and
            # successive halving's top rung can fall on it) would discard a finished result.
            if step < space.proxy.steps and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (proxy_loss {loss:.4f})")

        def zero_cost_history() -> list[float]:
            assert zc is not None  # evaluate_point asks only when the space has a zero-cost filter
            key = f"zero_cost_{zc.proxy}"
            return [
                t.user_attrs[key]
                for t in study.get_trials(deepcopy=False)
                if key in t.user_attrs and t.number != trial.number
            ]

        trial.set_user_attr("worker", worker_id())
        ahead = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number < trial.number and (counted(t) or t.state == TrialState.RUNNING)
        ]
        if len(ahead) >= settings.trials:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"{len(ahead)} trials before it already make --trials {settings.trials}")
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


def run_search(settings: SearchSettings, quiet: bool = False) -> optuna.Study:
    """`nas search`: run (or resume) the study until `settings.trials` trials have finished."""
    from tqdm.auto import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    if settings.trials < 1:
        raise NasError(f"--trials must be >= 1, got {settings.trials}")
    if settings.workers < 1:
        raise NasError(f"--workers must be >= 1, got {settings.workers}")
    prepared = prepare_search(settings.space, settings.cache, settings.teacher)
    space, cache, train_config = prepared.space, prepared.cache, prepared.train_config
    settings.folder.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, space)
    write_metadata(settings, space)

    children = []
    for rank in range(1, settings.workers):  # extra local workers share the storage
        worker = settings.model_copy(
            update={"storage": settings.storage_url(), "seed": settings.seed + rank, "workers": 1}
        )
        cmd = [sys.executable, "-m", "nas", *to_argv(worker), "--quiet"]
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

    while True:
        done, running = progress(study)
        if done >= settings.trials:
            break
        if done + running >= settings.trials:
            # The rest is in flight on other workers: wait for them, failing (and so retrying)
            # any whose worker died, so a lost trial is still run by someone.
            time.sleep(HEARTBEAT_S)
            fail_dead_local_trials(study)
            fail_stale_trials(study)
            continue
        study.optimize(
            objective,
            n_trials=1,
            catch=(Exception,),
            callbacks=[on_trial],
            gc_after_trial=True,
            show_progress_bar=False,
        )
    bar.close()
    failed = [(c.pid, code) for c in children if (code := c.wait()) != 0]
    if failed:  # the study is complete (others ran their share); say so rather than hide it
        print(f"warning: study {settings.study}: extra local workers exited with errors (pid, code): {failed}",
              file=sys.stderr)  # fmt: skip
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
