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
retried and the sampler draws a new point (an enqueued one, a baseline or a retry, is: its
parameters are known). Rerunning the same command continues until the requested number of
trials has finished; completed trials are never redone. Ctrl-C and SIGTERM mean the same as a
kill, handled at once: the running trials are failed and retried (interrupt.py, `stop_search`).

Draws: each worker start seeds its sampler from (seed, study, rank, attempt) (`seed_sampler`),
so a resumed or parallel worker does not replay another start's draws; a point whose
architecture the study already measured is not measured again (pruned as `duplicate_of`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from nas.core.errors import NasError
from nas.core.runfolder import atomic_path
from nas.core.settings import to_argv
from nas.search.interrupt import Interrupted, Interrupts
from nas.search.objective import Hooks, Rejected, evaluate_point, prepare_search
from nas.search.retry import StorageUnavailable
from nas.search.settings import SearchSettings
from nas.search.storage import (
    HEARTBEAT_S,
    arch_key,
    counted,
    fail_dead_local_trials,
    fail_stale_trials,
    find_duplicate,
    finished,
    open_storage,
    open_study,
    progress,
    retry_interrupted_trial,
    seed_sampler,
    worker_id,
    write_metadata,
)
from nas.space import sample_arch
from nas.space.schema import Space

# Heartbeats, the stale-trial callback and the matplotlib plots are marked experimental in Optuna;
# we rely on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)


def quiet_surplus() -> None:
    """Optuna logs every failed trial with a traceback; a `Surplus` trial (one that gave way because
    the study already had --trials when it started: expected at the end of a multi-worker search) is
    no failure to show, nor its "failed with value None" line (errors of an architecture keep theirs,
    and our own trial line names them)."""
    from nas.core.noise import DropMessage

    logger = logging.getLogger("optuna.study._optimize")
    for pattern in (r"because of the following error: Surplus\(", r"^Trial \d+ failed with value None\.$"):
        if not any(isinstance(f, DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))


class Surplus(Exception):
    """This trial would exceed --trials: workers that started at the same moment all saw room for
    one more. The later trial number gives way (recorded as FAIL without `error`: not counted)."""


def make_objective(
    study: optuna.Study,
    space: Space,
    settings: SearchSettings,
    cache,
    train_config,
    interrupts: Interrupts | None = None,
    started: list[int] | None = None,
):
    """The Optuna objective. `interrupts`: a signal cuts a trial's body at once (the trial is
    recorded `interrupted` and retried by `run_search`); `started` collects the numbers of the
    trials this process started."""
    import torch

    multi = len(space.objectives) > 1
    zc = space.proxy.zero_cost
    interrupts = interrupts or Interrupts()  # not entered: no handlers, allow() only checks
    started = [] if started is None else started
    keys: dict[int, str] = {}  # arch_key of earlier trials, by number (find_duplicate's cache)

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
        started.append(trial.number)
        try:
            with interrupts.allow():
                return measure(
                    trial, record, Hooks(record, report, zero_cost_history, settings.folder / "tracking")
                )
        except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: run_search retries this trial
            record({"interrupted": getattr(stop, "signal_name", "SIGINT")})
            raise

    def measure(trial: optuna.Trial, record, hooks: Hooks):
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
            if "baseline" not in trial.user_attrs:  # a baseline is measured, whatever ran before
                same = find_duplicate(study, trial.number, arch_key(arch.to_data()), keys)
                if same is not None:
                    record({"duplicate_of": same})
                    raise Rejected("duplicate", f"duplicate of trial {same}")
            result = evaluate_point(space, arch, cache, train_config, hooks)
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
    note = (
        a.get("reason")
        or a.get("error")
        or ("interrupted by " + a["interrupted"] if "interrupted" in a else "")
        or ("baseline " + a["baseline"] if "baseline" in a else "")
    )
    return (
        f"trial {trial.number:>4}  params {params:>9}  MACs {macs:>9}  latency {latency:>9}  "
        f"proxy_loss {score:>7}  {trial.state.name:<8} {note}".rstrip()
    )


RANK_ENV = "NAS_SEARCH_RANK"  # set by `nas search --workers N` on the workers it starts: 1..N-1
WORKER_MODULE = "nas"  # extra local workers run `python -m WORKER_MODULE search ...`
WORKER_STOP_S = 30  # seconds an interrupted search waits for its workers to stop before killing them
POLL_S = HEARTBEAT_S  # seconds between two looks at the storage for other workers' finished trials


def worker_rank() -> int:
    """This process's rank among the local workers of one `nas search` (0: the one started by
    the user, or one started by hand on another machine)."""
    value = os.environ.get(RANK_ENV, "0")
    if not value.isdigit():
        raise NasError(f"environment {RANK_ENV}={value!r}: not a worker rank (allowed: 0, 1, 2, ...)")
    return int(value)


class TrialLines:
    """The progress bar and one line per finished trial of every worker sharing the study: its
    own at once (`poll` after each trial), the others' from a look at the storage every POLL_S
    seconds in a thread. Trials finished before this start are not repeated."""

    def __init__(self, study: optuna.Study, trials: int, desc: str, quiet: bool):
        from tqdm.auto import tqdm

        self.study, self.trials, self.quiet = study, trials, quiet
        self._lock = threading.Lock()
        self._shown = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        done = min(finished(study), trials)
        self.bar = tqdm(total=trials, initial=done, desc=desc, unit="trial", disable=quiet)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nas-trial-lines", daemon=True)
        if not quiet:
            self._thread.start()

    def poll(self) -> None:
        with self._lock:
            trials = self.study.get_trials(deepcopy=False)
            for t in trials:  # in trial-number order
                if t.state.is_finished() and t.number not in self._shown:
                    self._shown.add(t.number)
                    if not self.quiet:
                        self.bar.write(trial_line(t))
            self.bar.n = min(sum(counted(t) for t in trials), self.trials)
            self.bar.refresh()

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception:  # display only: the main thread's own storage calls report a broken
                continue  # storage; a passing hiccup is caught up at the next poll

    def close(self) -> None:
        """The last lines (the trials an interrupt failed included), then the bar."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(StorageUnavailable):  # the search reports it; the lines shown stand
            self.poll()
        self.bar.close()


def start_workers(settings: SearchSettings) -> list[subprocess.Popen]:
    """`--workers N`: N-1 more processes sharing the storage, rank 1..N-1 in RANK_ENV (each
    seeds its sampler with its rank, `seed_sampler`), quiet: this process prints for them."""
    worker = settings.model_copy(update={"storage": settings.storage_url(), "workers": 1})
    cmd = [sys.executable, "-m", WORKER_MODULE, *to_argv(worker), "--quiet"]
    return [
        subprocess.Popen(cmd, env={**os.environ, RANK_ENV: str(rank)}) for rank in range(1, settings.workers)
    ]


def stop_search(
    study: optuna.Study | None, started: list[int], children: list[subprocess.Popen], signum: int
) -> list[int]:
    """After Ctrl-C or SIGTERM: pass the signal on to the extra local workers (each retries its
    own trial the same way), retry this process's interrupted trial, kill any worker still
    running after WORKER_STOP_S and retry its trial as a lost one. Returns the trials waiting to
    be retried."""
    for child in children:  # first, so that they stop before this process enqueues its retry
        if child.poll() is None:
            child.send_signal(signum)  # a second one (the terminal's Ctrl-C reached it too) is ignored
    if study is not None and started:
        retry_interrupted_trial(study, started[-1])
    wait_for_workers(children, WORKER_STOP_S)
    if study is None:
        return []
    fail_dead_local_trials(study)  # a worker killed above, mid-trial
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sorted(t.user_attrs["retry_of"] for t in waiting if "retry_of" in t.user_attrs)


def run_search(settings: SearchSettings, quiet: bool = False) -> optuna.Study:
    """`nas search`: run (or resume) the study until `settings.trials` trials have finished.

    Ctrl-C (SIGINT) or SIGTERM: the running trials (this process's and its extra workers') are
    failed and re-enqueued with exactly their parameters, then `Interrupted` is raised, naming
    them (the command turns it into exit code 130 / 143 and a resume hint)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    quiet_surplus()
    if settings.trials < 1:
        raise NasError(f"--trials must be >= 1, got {settings.trials}")
    if settings.workers < 1:
        raise NasError(f"--workers must be >= 1, got {settings.workers}")
    rank = worker_rank()
    study: optuna.Study | None = None
    storage = None
    children: list[subprocess.Popen] = []
    started: list[int] = []  # trials this process started, the running one last
    lines: TrialLines | None = None
    with Interrupts(ignore_after=rank > 0) as interrupts:
        try:
            with interrupts.allow():  # reading the space, the cache, a teacher: safe to cut
                prepared = prepare_search(
                    settings.space, settings.cache, settings.teacher, settings.folder.parent
                )
            space, cache, train_config = prepared.space, prepared.cache, prepared.train_config
            settings.folder.mkdir(parents=True, exist_ok=True)
            storage = open_storage(settings.storage_url(), retry_s=settings.storage_retry_s)
            study = open_study(settings, space, storage)
            write_metadata(settings, space)
            seed_sampler(study, settings, len(space.objectives) > 1, rank)
            children = start_workers(settings)
            retried = fail_dead_local_trials(study)
            if retried and not quiet:
                print(f"study {settings.study}: trials {retried} were left running by a dead process; failed and retried")  # fmt: skip
            objective = make_objective(study, space, settings, cache, train_config, interrupts, started)
            lines = shown = TrialLines(study, settings.trials, f"study {settings.study}", quiet)
            while True:
                interrupts.check()  # a signal held while Optuna was telling a trial's state
                done, running = progress(study)
                if done >= settings.trials:
                    break
                if done + running >= settings.trials:
                    # The rest is in flight on other workers: wait for them, failing (and so
                    # retrying) any whose worker died, so a lost trial is still run by someone.
                    with interrupts.allow():
                        time.sleep(HEARTBEAT_S)
                    fail_dead_local_trials(study)
                    fail_stale_trials(study)
                    continue
                study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda study, trial: shown.poll()],
                               gc_after_trial=True, show_progress_bar=False)  # fmt: skip
            with interrupts.allow():
                codes = [(c.pid, c.wait()) for c in children]
        except KeyboardInterrupt as exc:
            stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            stop.retried = stop_search(study, started, children, stop.signum)
            if stop is exc:
                raise
            raise stop from exc
        except Exception:
            gone = getattr(storage, "gone", None)  # a server storage lost for --storage-retry-s
            if gone is None:
                raise
            wait_for_workers(children, settings.storage_retry_s + WORKER_STOP_S)  # each says so
            raise gone from None
        finally:
            if lines is not None:
                lines.close()
    assert study is not None  # opened above, or the search raised
    failed = [(pid, code) for pid, code in codes if code != 0]
    if failed:  # the study is complete (others ran their share); say so rather than hide it
        print(f"warning: study {settings.study}: extra local workers exited with errors (pid, code): {failed}",
              file=sys.stderr)  # fmt: skip
    export_trials_csv(study, settings.folder / "trials.csv")
    return study


def wait_for_workers(children: list[subprocess.Popen], timeout: float) -> None:
    """Wait (bounded) for the extra local workers to stop on their own; kill those that do not."""
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def export_trials_csv(study: optuna.Study, path: Path) -> None:
    """trials.csv, replaced in one rename: the workers of a study on a server storage that share
    a results folder each write it when they finish."""
    frame = study.trials_dataframe(attrs=("number", "state", "values", "params", "user_attrs", "duration"))
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


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
