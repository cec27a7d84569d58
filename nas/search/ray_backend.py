"""The Ray Tune engine: the same objective through `Tuner` + `OptunaSearch` + ASHA, on a local Ray
or an existing cluster. Trials are recorded in the same Optuna storage as the Optuna engine, so
`nas export` and `nas report` work on either.

- Resources per trial: CPUs, GPUs (fractional shares a GPU). A request no node can satisfy would
  stay PENDING forever in Ray; it is refused up front against `ray.cluster_resources()`.
- `latency_accelerator`: latency is measured in a Ray task pinned to a node of that accelerator
  type (Ray's `accelerator_type:<TYPE>` resource, which Ray declares, as 1, on a node with such a
  GPU, e.g. A10G). The task asks for that whole resource, so timings on one node run one at a time,
  a GPU when the space measures on cuda, and no CPU. Proxy training is kept off that node by CPU:
  the node is started with `--num-cpus=0` (KubeRay: `rayStartParams: {num-cpus: "0"}`) and every
  trial needs CPUs (`cpus_per_trial` > 0 is required), so no trial fits there and the node's GPU
  and cores stay quiet for timing. A latency node that offers CPUs is warned about (trials may
  train on it). Each trial records `latency_node` and `train_node` (Ray node ids).
- ASHA stops trials early on the proxy loss; with several objectives Optuna's sampler still builds
  a Pareto front from the trials that ran to the end.
- Failures: an exception of the architecture (raised in the trainable or the latency task) is
  caught and reported as the trial's `error` (Optuna FAIL), never retried; only what Tune still
  sees as a failure, a trial actor lost with its node or worker, is retried (`FailureConfig`).
- A killed run resumes from results/<study>/ray/ with `Tuner.restore`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from nas.core.errors import NasError
from nas.search.objective import (
    METRIC_KEYS,
    Hooks,
    Rejected,
    evaluate_point,
    measure_cost,
    prepare_search,
)
from nas.search.settings import SearchSettings
from nas.search.storage import (
    SAMPLERS,
    arch_key,
    find_duplicate,
    open_storage,
    open_study,
    space_digest,
    write_metadata,
)
from nas.space import FixedChoices, sample_arch

# Result keys copied to the Optuna trial's user attributes (what export and report read).
ATTRS = ("arch_name", "params", "macs", "attention_macs", "model_class", "latency_ms_p50",
         "latency_ms_p90", "peak_memory_mb", "other_cores_busy", "proxy_loss", "proxy_seconds", "rejected", "reason", "error", "latency_node", "train_node")  # fmt: skip
# Config key the searcher adds to a point the study already measured: the trainable reports it
# rejected as a duplicate at once (the Optuna engine prunes such trials the same way).
DUPLICATE_OF = "__duplicate_of"


@dataclass
class RaySettings:
    address: str | None = None  # None: start a local Ray
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    latency_accelerator: str | None = None  # e.g. "A10G": measure latency on such a node


def check_resources(request: dict[str, float], cluster: dict[str, float]) -> None:
    """Refuse what no node can give (Ray would wait forever)."""
    for key, amount in request.items():
        if amount > 0 and cluster.get(key, 0.0) < amount:
            have = ", ".join(f"{k}={v:g}" for k, v in sorted(cluster.items()) if not k.startswith("node:"))
            raise NasError(f"Ray cluster cannot satisfy {key}={amount:g} per trial (cluster has: {have})")


def _connect(address: str | None, quiet: bool) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=not quiet, configure_logging=False)
        else:
            # Ray runs its workers at nice 15, so any other busy process on the machine starves
            # the trials (measured: 3% of a core beside two spinning processes). Here the trials
            # are the user's foreground work; a cluster keeps its own setting.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(
                address="local",  # a new instance: never join a cluster someone started on this host
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                log_to_driver=not quiet,
                configure_logging=False,
            )
    except Exception as exc:  # ConnectionError, TimeoutError, RuntimeError depending on the address
        raise NasError(
            f"--ray-address {address or 'local'}: cannot connect ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


OWNER_FILE = "owner.json"  # beside the Tune experiment: which study, storage and space it serves


def write_owner(path: Path, owner: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps(owner, indent=2))
    tmp.replace(path / OWNER_FILE)


def check_owner(path: Path, owner: dict[str, str]) -> None:
    """A saved Tune experiment is restored only into the study, storage and space it was started
    with: its searcher points at that storage, so restoring it under other settings would write
    trials elsewhere (or fail deep inside SQLAlchemy when that storage is gone)."""
    fresh = f"move {path} aside (or delete it) to start a new Ray experiment"
    try:
        saved = json.loads((path / OWNER_FILE).read_text())
    except (OSError, ValueError):
        raise NasError(
            f"{path}: a saved Ray experiment with no readable {OWNER_FILE} (which study, storage"
            f" and space it belongs to); {fresh}"
        ) from None
    for key, label in (("study", "study"), ("storage", "storage"), ("space_digest", "space (digest)")):
        if saved.get(key) != owner[key]:
            raise NasError(
                f"{path}: the saved Ray experiment belongs to {label} {saved.get(key)!r}, not"
                f" {owner[key]!r}; rerun with the original settings to resume it, or {fresh}"
            )


# A lost node or worker fails a trial through no fault of its architecture (whose own errors are
# caught in the trainable and recorded, see `trainable`), so Tune restarts it from scratch; 3
# restarts let a trial survive a few node losses while a broken cluster still ends the trial.
NODE_LOSS_RETRIES = 3


def _latency_task(space, arch) -> dict[str, Any]:
    import ray

    return {**measure_cost(space, arch), "latency_node": ray.get_runtime_context().get_node_id()}


def latency_resources(accelerator: str, device: str) -> dict[str, Any]:
    """Ray options of the latency task: the node's whole `accelerator_type` token (Ray declares 1
    per node), so two timings never share a node; a whole GPU to time on cuda; no CPU, so it runs
    on a latency node started with `--num-cpus=0`."""
    return {
        "num_cpus": 0,
        "num_gpus": 1 if device.startswith("cuda") else 0,
        "resources": {f"accelerator_type:{accelerator}": 1.0},
    }


def _remote_measure(accelerator: str | None, device: str):
    """A `measure` function for evaluate_point: local, or a Ray task on the accelerator type."""
    if accelerator is None:
        return measure_cost
    # Outside the trial's placement group (Tune makes child tasks inherit it, and its bundle has
    # no accelerator token, so the task could never be scheduled).
    options = {**latency_resources(accelerator, device), "scheduling_strategy": "DEFAULT"}

    def measure(space, arch):
        import ray

        return ray.get(ray.remote(**options)(_latency_task).remote(space, arch))

    return measure


def latency_node_warnings(nodes: list[dict], accelerator: str) -> list[str]:
    """One line per live node of the accelerator type that also offers CPUs: trials may train
    there, beside (and slowing) the latency timings. `nodes` is `ray.nodes()`."""
    key = f"accelerator_type:{accelerator}"
    return [
        f"Ray node {n['NodeID'][:12]} ({key}) offers CPU={n['Resources']['CPU']:g}: proxy trainings"
        " may run there and disturb the latency timings; start it with --num-cpus=0 to reserve it"
        for n in nodes
        if n.get("Alive") and key in n.get("Resources", {}) and n["Resources"].get("CPU", 0) > 0
    ]


class DefineByRun:
    """OptunaSearch's search space: sampling an architecture registers its parameters (the
    trainable rebuilds the architecture from them). A class, so the searcher can be pickled."""

    def __init__(self, space):
        self.space = space

    def __call__(self, ot_trial) -> None:
        sample_arch(self.space, ot_trial)


def _searcher_class():
    from ray.tune.search.optuna import OptunaSearch

    class RecordingOptunaSearch(OptunaSearch):
        """OptunaSearch that stores each trial's figures as Optuna user attributes and records
        rejected points and trials ASHA stopped early as pruned (what the Optuna engine does), so
        export and report see the same study either way."""

        full_steps = 0  # proxy steps of a trial that ran to the end; set per search
        space: Any = None  # the search space; set per search (duplicate check in `suggest`)
        _keys: dict[int, str] | None = None  # arch_key of earlier trials by number (find_duplicate's cache)

        def suggest(self, trial_id: str):
            """OptunaSearch's point, with the architecture recorded at once and a point the study
            already measured (or is measuring) marked `DUPLICATE_OF`: a resumed or replaying sampler
            never spends a trial on it. Baselines are always measured."""
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if not isinstance(config, dict) or ot_trial is None or self.space is None:
                return config
            assert self._ot_study is not None  # OptunaSearch creates it before any trial
            arch = sample_arch(self.space, FixedChoices(config))
            ot_trial.set_user_attr("arch", arch.to_data())
            if "baseline" in ot_trial.user_attrs:
                return config
            if self._keys is None:
                self._keys = {}
            # One driver owns a Ray study: a running trial this searcher does not hold is an orphan of a
            # killed driver (failed when the run ends, never measured), so it is no measurement.
            running = {
                t.number for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            }
            orphans = running - {t.number for t in self._ot_trials.values()}
            same = find_duplicate(
                self._ot_study, ot_trial.number, arch_key(arch.to_data()), self._keys, orphans
            )
            if same is None:
                return config
            ot_trial.set_user_attr("duplicate_of", same)
            return {**config, DUPLICATE_OF: same}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            import optuna

            # OptunaSearch's `_ot_trials` (Ray trial id -> Optuna trial), `_ot_study` and
            # `_completed_trials` are private: Ray has no public way to reach the Optuna trial
            # behind a Tune trial. tests/search/test_ray_backend.py fails if a Ray release renames them.
            ot_trial = self._ot_trials.get(trial_id)
            study = self._ot_study
            assert study is not None  # set by OptunaSearch before any trial is suggested
            if ot_trial is not None and study.get_trials(deepcopy=False)[ot_trial.number].state.is_finished():
                # A restored experiment reruns a trial whose end its last saved state missed (the
                # driver died after the trial had told Optuna): the first figures stand.
                self._completed_trials.add(trial_id)
                return
            if ot_trial is not None and result and "error" in result:  # the architecture raised
                for key in ATTRS:
                    if key in result:
                        ot_trial.set_user_attr(key, result[key])
                study.tell(ot_trial, state=TrialState.FAIL)
                self._completed_trials.add(trial_id)
                return
            if ot_trial is not None and result:
                for key in ATTRS:
                    if key in result:
                        ot_trial.set_user_attr(key, result[key])
                if "arch_json" in result:
                    ot_trial.set_user_attr("arch", json.loads(result["arch_json"]))
                if (
                    "proxy_loss" in result and "step" in result
                ):  # proxy steps run, as the Optuna engine records
                    ot_trial.set_user_attr("last_step", int(result["step"]))
                stopped_early = not error and result.get("step", 0) < self.full_steps
                if "rejected" in result or stopped_early:
                    if stopped_early and "rejected" not in result:
                        ot_trial.set_user_attr("reason", f"stopped by ASHA at step {result.get('step')}")
                    assert self._ot_study is not None  # OptunaSearch creates it before any trial
                    self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
                    self._completed_trials.add(trial_id)
                    return
            if ot_trial is not None and error and not (result and "proxy_loss" in result):
                ot_trial.set_user_attr("error", "trial raised; see the Ray trial's error.txt")
            super().on_trial_complete(trial_id, result, error)

    return RecordingOptunaSearch


def run_ray_search(settings: SearchSettings, ray_settings: RaySettings, quiet: bool = False):
    """`nas search --backend ray`: run or resume the study as a Ray Tune experiment."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from nas.data.cache import open_cache

    if settings.trials < 1:
        raise NasError(f"--trials must be >= 1, got {settings.trials}")
    if ray_settings.latency_accelerator and not ray_settings.cpus_per_trial > 0:
        raise NasError(
            f"--cpus-per-trial must be > 0 with --latency-accelerator, got {ray_settings.cpus_per_trial:g}:"
            " trials are kept off the latency node (started with --num-cpus=0) by needing CPUs"
        )
    prepared = prepare_search(settings.space, settings.cache, settings.teacher, settings.folder.parent)
    space, train_config = prepared.space, prepared.train_config
    cache_path = str(Path(prepared.cache.path).resolve())  # trials on other nodes open it by this path
    path = (settings.folder / "ray").resolve()  # the Tune experiment: path / study name
    owner = {
        "study": settings.study,
        "storage": settings.storage_url(),
        "space_digest": space_digest(settings.space, settings.teacher),
    }
    restore = tune.Tuner.can_restore(path / settings.study)
    if restore:  # before anything is opened or written: refusing must change nothing
        check_owner(path, owner)
    settings.folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(settings.storage_url(), heartbeat=False)
    study = open_study(settings, space, storage)  # creates or checks the study (space digest, baselines)
    write_metadata(settings, space)

    _connect(ray_settings.address, quiet)
    import ray

    request = {"CPU": ray_settings.cpus_per_trial, "GPU": ray_settings.gpus_per_trial}
    accelerator = ray_settings.latency_accelerator
    if accelerator:
        latency = latency_resources(accelerator, space.latency.device)
        check_resources({**latency["resources"], "GPU": latency["num_gpus"]}, ray.cluster_resources())
        for line in latency_node_warnings(ray.nodes(), accelerator):
            print(f"warning: {line}", file=sys.stderr)
    check_resources(request, ray.cluster_resources())

    metrics = [o.metric for o in space.objectives]
    modes = ["min" if o.direction == "minimize" else "max" for o in space.objectives]
    multi = len(metrics) > 1
    measure = _remote_measure(accelerator, space.latency.device)
    study_name = settings.study
    tracking = (settings.folder / "tracking").resolve()  # proxy runs with report_to: one run per trial

    def trainable(config: dict[str, Any]) -> None:
        if DUPLICATE_OF in config:  # measured already (RecordingOptunaSearch.suggest): not again
            rejected: dict[str, Any] = {m: math.nan for m in metrics}
            rejected.update(rejected="duplicate", reason=f"duplicate of trial {config[DUPLICATE_OF]}", step=0)
            tune.report(rejected)
            return
        arch = sample_arch(
            space, FixedChoices(config), name=f"{study_name}-{tune.get_context().get_trial_id()}"
        )
        cache = open_cache(cache_path)
        # Every report carries everything known so far: ASHA may stop a trial at any report, and
        # the searcher stores the last one (the architecture as JSON: Ray flattens nested dicts).
        record: dict[str, Any] = {
            "arch_json": json.dumps(arch.to_data()),
            "train_node": ray.get_runtime_context().get_node_id(),
        }

        def objectives(proxy_loss: float) -> dict[str, float]:
            # Ray checks that every report names every objective: cost figures exist before training.
            known = {**record, "proxy_loss": proxy_loss}
            return {name: float(known.get(METRIC_KEYS[name], math.nan)) for name in metrics}

        def report(step: int, loss: float) -> None:
            tune.report({**record, **objectives(loss), "proxy_loss": loss, "step": step})

        def failed(exc: BaseException) -> None:
            traceback.print_exception(exc)  # into the trial's log
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            tune.report({**record, **objectives(math.nan), "error": message, "step": 0})

        try:
            result = evaluate_point(
                space,
                arch,
                cache,
                train_config,
                Hooks(record.update, report, list, tracking),
                measure=measure,
            )
        except Rejected as rejected:
            # NaN objectives never reach Optuna: RecordingOptunaSearch records the trial as pruned.
            tune.report(
                {
                    **record,
                    **objectives(math.nan),
                    "rejected": rejected.kind,
                    "reason": rejected.reason,
                    "step": 0,
                }
            )
            return
        except ray.exceptions.RayTaskError as exc:  # the latency task raised: the architecture's
            failed(exc.cause if isinstance(exc.cause, BaseException) else exc)
            return
        except ray.exceptions.RayError:  # a lost node, worker or object: Tune retries the trial
            raise
        except Exception as exc:  # the architecture's own error: recorded, never retried
            failed(exc)
            return
        final = {**record, **result.metrics, "step": space.proxy.steps}
        for name in metrics:
            final[name] = float(result.metrics[METRIC_KEYS[name]])
        tune.report(final)

    # Baselines are already enqueued in the Optuna study; OptunaSearch's ask() picks them up first.
    searcher_class = _searcher_class()
    searcher_class.full_steps = space.proxy.steps
    searcher_class.space = space
    searcher = searcher_class(
        space=DefineByRun(space),
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        sampler=SAMPLERS[settings.sampler](settings.seed, multi),
        study_name=study_name,
        storage=storage,
    )
    scheduler = ASHAScheduler(
        metric="proxy_loss",
        mode="min",
        time_attr="step",
        max_t=space.proxy.steps,
        grace_period=min(space.proxy.report_every, space.proxy.steps),
    )
    resources = {"cpu": ray_settings.cpus_per_trial, "gpu": ray_settings.gpus_per_trial}
    wrapped = tune.with_resources(trainable, resources)
    if restore:
        tuner = tune.Tuner.restore(
            str(path / study_name), trainable=wrapped, resume_unfinished=True, resume_errored=False
        )
    else:
        tuner = tune.Tuner(
            wrapped,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=settings.trials,
                max_concurrent_trials=settings.workers,
            ),
            run_config=tune.RunConfig(
                name=study_name,
                storage_path=str(path),
                failure_config=tune.FailureConfig(max_failures=NODE_LOSS_RETRIES),
                verbose=0 if quiet else 1,
            ),
        )
    write_owner(path, owner)
    # Optuna trials a killed driver left RUNNING: Tune resumes those its last saved state knew.
    left_running = (
        {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if restore
        else set()
    )
    results = tuner.fit()
    fail_orphans(study, left_running)
    del study
    return results


def fail_orphans(study, left_running: set[int]) -> None:
    """Fail the trials a killed driver started after Tune last saved its state: the restored
    experiment never heard of them, so they would stay RUNNING forever (Tune drew a new point in
    their place, so the study still reaches its trial count). Like any trial whose process was
    lost they are FAIL without `error` (not counted); the study's `orphaned_trials` lists them."""
    orphaned = list(study.user_attrs.get("orphaned_trials", []))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in left_running:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            orphaned.append(t.number)
    if orphaned:
        study.set_user_attr("orphaned_trials", sorted(set(orphaned)))
