"""The study in its storage, shared by both engines (Optuna's loop in study.py, Ray Tune's in
ray_backend.py), as Optuna keeps storages/_heartbeat.py apart from study/_optimize.py: opening the
storage, samplers and pruners by name, creating or joining a study (its space digest, baselines
enqueued first), liveness (heartbeats, stale and dead trials failed and retried with exactly their
parameters) and which trials count toward --trials.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError

from nas.core.errors import NasError
from nas.core.runfolder import RunFolder, environment
from nas.search.retry import RetryingStorage, worker_host, worker_id  # noqa: F401 (worker_id: re-exported)
from nas.search.settings import STORAGE_RETRY_S, SamplerName, SearchSettings
from nas.space import load_arch
from nas.space.sample import arch_to_params, canonical
from nas.space.schema import Arch, Space

# Heartbeats and the stale-trial callback are marked experimental in Optuna; we rely on them
# knowingly, so their warnings are noise for users.
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
    # Gaussian process + (log) expected (hypervolume) improvement; single and multi-objective.
    # Its search space is the parameters every trial shares: the conditional ones of a deeper
    # define-by-run point (a level only some depths have) are drawn at random, by design here.
    "gp": lambda seed, multi: optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=5, warn_independent_sampling=False
    ),
}
assert tuple(SAMPLERS) == typing.get_args(SamplerName), "SamplerName must list the SAMPLERS keys"


def sampler_seed(seed: int, study: str, rank: int, attempt: int) -> int:
    """The sampler seed of one worker's start on a study: `seed` itself for the first worker's
    first start (a new study with one worker draws what `--seed` always drew), else a hash of
    (seed, study, rank, attempt), so that a resumed or parallel worker never replays another
    start's draws. 32 bits: NumPy's RandomState, under every sampler, takes no more."""
    if rank == 0 and attempt == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{study}/{rank}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def seed_sampler(study: optuna.Study, settings: SearchSettings, multi: bool, rank: int) -> int:
    """Give this worker its own sampler seed (`sampler_seed`); return it. `attempt` is the
    number of trials the study held when the worker started, WAITING ones (enqueued baselines and
    retries) aside: it grows with every start that drew anything (each draw is a trial), needs
    no counter of its own in the storage, and is 0 for a new study. Two starts that see the same
    count on the same rank drew nothing in between; workers started together differ by rank."""
    attempt = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
    seed = sampler_seed(settings.seed, settings.study, rank, attempt)
    study.sampler = SAMPLERS[settings.sampler](seed, multi)
    return seed


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


def space_digest(path: str | Path, teacher: str | None = None) -> str:
    """The space file's content (and `--teacher`'s resolved path: another teacher, another study)."""
    h = hashlib.sha256(Path(path).read_bytes())
    if teacher is not None:
        h.update(str(Path(teacher).resolve()).encode())
    return h.hexdigest()[:16]


def open_storage(url: str, heartbeat: bool = True, retry_s: float = STORAGE_RETRY_S) -> RDBStorage:
    """RDB storage, with heartbeats for `study.optimize` (the Ray engine asks and tells instead);
    an unreachable or malformed URL is a NasError. A server storage (not SQLite) rides out a
    lost server for `retry_s` seconds (retry.py), then raises StorageUnavailable."""
    beat: dict[str, Any] = {}
    if heartbeat:
        beat = dict(
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=retry_lost_trial,
        )
    if url.startswith("postgresql://"):  # SQLAlchemy < 2.1 would pick psycopg2, which we do not ship
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    for attempt in range(5):
        try:
            if url.startswith("sqlite"):
                return RDBStorage(url, **beat)
            return RetryingStorage(url, retry_s=retry_s, grace_s=GRACE_S, **beat)
        except Exception as exc:  # sqlalchemy raises many types: connection, driver, URL syntax
            # Two processes creating a new storage at once (workers, a dashboard): the loser's
            # schema insert collides (PostgreSQL: IntegrityError; SQLite: "table ... already
            # exists"); the schema exists a moment later, so try again.
            racing = isinstance(exc, IntegrityError) or "already exists" in str(exc)
            if racing and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise NasError(
                f"storage {url}: cannot open ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            ) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def open_study(settings: SearchSettings, space: Space, storage=None) -> optuna.Study:
    """Create the study or load it; refuse to mix a study with another space."""
    if settings.sampler not in SAMPLERS:
        raise NasError(f"--sampler {settings.sampler}: unknown (allowed: {', '.join(SAMPLERS)})")
    storage = storage or open_storage(settings.storage_url(), retry_s=settings.storage_retry_s)
    multi = len(space.objectives) > 1
    sampler = SAMPLERS[settings.sampler](settings.seed, multi)
    proxy = space.proxy
    pruner = (
        optuna.pruners.NopPruner() if multi else make_pruner(proxy.pruner, proxy.steps, proxy.report_every)
    )
    digest = space_digest(settings.space, settings.teacher)
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    if settings.study not in names:
        try:
            study = optuna.create_study(
                study_name=settings.study,
                storage=storage,
                directions=[o.direction for o in space.objectives],
                sampler=sampler,
                pruner=pruner,
            )
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker created it between our look and our create: join theirs
        else:
            _set_up(study, settings, space, digest)
            return study
    study = optuna.load_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner)
    theirs = _wait_ready(study)
    if theirs is None and not study.get_trials(deepcopy=False):  # its creator died setting it up
        _set_up(study, settings, space, digest)
        theirs = digest
    if theirs != digest:
        raise NasError(
            f"study {settings.study} exists in {settings.storage_url()} with another space"
            f" ({study.user_attrs.get('space_file')}, digest {theirs}); use another --study name"
        )
    return study


READY_WAIT_S = 60  # how long a joining worker waits for the creator to finish setting a study up


def _set_up(study: optuna.Study, settings: SearchSettings, space: Space, digest: str) -> None:
    """Record the space and enqueue the baselines; the digest is written last and marks the
    study ready, so a worker that joins a study being created waits for its baselines."""
    study.set_user_attr("space_file", str(settings.space))
    study.set_user_attr("space", space.model_dump(mode="json"))
    study.set_user_attr("objectives", [o.metric for o in space.objectives])
    for rel in space.baselines:
        path = Path(settings.space).parent / rel
        arch = load_arch(path)
        study.enqueue_trial(
            arch_to_params(space, arch, str(path)), user_attrs={"baseline": arch.name}, skip_if_exists=True
        )
    study.set_user_attr("space_digest", digest)


def _wait_ready(study: optuna.Study) -> str | None:
    """The study's space digest, waiting (a state, bounded) while another worker creates it."""
    deadline = time.monotonic() + READY_WAIT_S
    while True:
        digest = study.user_attrs.get("space_digest")
        if digest is not None or time.monotonic() > deadline:
            return digest
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def retry_lost_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, interrupted: bool = False
) -> int | None:
    """Re-enqueue a trial whose process was lost, with exactly its parameters, if its architecture
    had been chosen completely (or it was enqueued: a baseline or a retry, whose parameters are
    known from the start); return the number it was retried from, or None.

    Used as the storage's heartbeat-stale callback (a trial of any host), by
    `fail_dead_local_trials` (this host) and for an interrupted trial (`interrupted`: Ctrl-C or
    SIGTERM, the user's doing, so it does not use up one of the MAX_RETRY retries). Optuna's own
    RetryHeartbeatStaleTrialCallback would re-enqueue a half-chosen trial's partial parameters,
    and the retry would then draw the rest anew: a different architecture under the old trial's
    name. It also copies every user attribute, the dead worker's id included."""
    if "arch" in trial.user_attrs:
        params = trial.params
    elif "fixed_params" in trial.system_attrs:
        params = trial.system_attrs["fixed_params"]  # enqueued: its whole point, even if unsampled
    else:
        return None  # lost while choosing: no architecture to retry
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRY and not interrupted:
        return None
    attrs: dict[str, Any] = {"retry_of": trial.number, "retries": retries + (not interrupted)}
    if "baseline" in trial.user_attrs:
        attrs["baseline"] = trial.user_attrs["baseline"]  # so `*baseline` picks still find it
    study.enqueue_trial(params, user_attrs=attrs)
    return trial.number


def retry_interrupted_trial(study: optuna.Study, number: int) -> int | None:
    """Fail (if Optuna has not yet) and retry trial `number`, the last one this process started,
    when an interrupt cut it (the objective records `interrupted`); None if it had finished on its
    own or was retried already."""
    trials = study.get_trials(deepcopy=False)
    trial = next(t for t in trials if t.number == number)
    if any(t.user_attrs.get("retry_of") == number for t in trials):
        return None
    if trial.state == TrialState.RUNNING:
        try:
            study.tell(number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            return None  # another process found it dead and failed (and retried) it first
    elif trial.state != TrialState.FAIL or "interrupted" not in trial.user_attrs:
        return None  # finished as it would have anyway: completed, pruned, an error, surplus
    return retry_lost_trial(study, trial, interrupted=True)


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """RUNNING trials started on this host by a process that no longer exists (a SIGKILLed
    search): fail them now and retry them (`retry_lost_trial`), instead of waiting GRACE_S for
    the heartbeat to go stale. Trials of live or remote workers are left to the heartbeat."""
    host = worker_host()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if trial_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another process failed it first (and retried it)
        retry_lost_trial(study, trial)
        failed.append(trial.number)
    return failed


def arch_key(data: dict[str, Any]) -> str:
    """A trial's `arch` attribute as `canonical` tells architectures apart (no name, no head
    choices of levels without attention)."""
    return json.dumps(canonical(Arch.model_validate(data)), sort_keys=True)


def find_duplicate(
    study: optuna.Study,
    number: int,
    key: str,
    keys: dict[int, str] | None = None,
    skip: set[int] | frozenset[int] = frozenset(),
) -> int | None:
    """The earliest trial that measured (or is measuring) the architecture `key` of trial
    `number`: completed or pruned trials of any number, running ones with a lower number (of two
    that run at once, the later one gives way). Failed trials are not measurements (a retry
    repeats its lost trial's architecture on purpose); nor are trials pruned as duplicates.
    `keys` caches `arch_key` by trial number across calls (a trial's `arch` never changes); `skip`:
    trial numbers that are no measurement (running trials a killed driver left, which never finish)."""
    keys = {} if keys is None else keys
    for t in study.get_trials(deepcopy=False):
        if (
            t.number == number
            or t.number in skip
            or "arch" not in t.user_attrs
            or "duplicate_of" in t.user_attrs
        ):
            continue
        if t.state == TrialState.RUNNING and t.number > number:
            continue
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            continue
        if t.number not in keys:
            keys[t.number] = arch_key(t.user_attrs["arch"])
        if keys[t.number] == key:
            return t.number
    return None


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Finished trials that count toward --trials: a FAIL without an `error` attribute is a trial
    whose process died (retried if its architecture was chosen) or a `surplus` one that gave way,
    not a failure of the architecture."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def finished(study: optuna.Study) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def progress(study: optuna.Study) -> tuple[int, int]:
    """(trials that count toward --trials, trials running now on any worker)."""
    trials = study.get_trials(deepcopy=False)
    return sum(counted(t) for t in trials), sum(t.state == TrialState.RUNNING for t in trials)


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's heartbeat check, which `optimize` runs only before each trial it starts: a worker
    waiting for the others runs it itself, so a trial of a dead remote worker is still retried."""
    optuna.storages.fail_stale_trials(study)


def write_metadata(settings: SearchSettings, space: Space) -> None:
    """results/<study>/: the resolved space, the settings, the environment."""
    folder = RunFolder(settings.folder).mkdir()
    folder.write_yaml("space.yaml", space)
    env = environment(settings.seed)
    settings_data = settings.model_dump(mode="json", exclude={"dry_run"})
    folder.write_json("search.json", {"settings": settings_data, "environment": env})
