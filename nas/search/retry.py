"""A database server that goes away for a while (a restart, a failover) does not end a search.

`RetryingStorage` is Optuna's RDBStorage whose every call that reaches the server is retried with
exponential backoff while the connection is lost, for at most `retry_s` seconds in a row
(`--storage-retry-s`); the pool checks each connection before use (SQLAlchemy's
`pool_pre_ping`), so a restarted server's dead connections are replaced, not reported. A server
gone longer is `StorageUnavailable`, and every later call of the process fails at once: the
search stops with one line and exit code 75 (EX_TEMPFAIL, sysexits.h: try again later); the
trials it was running are retried by the next `nas search` (their process is gone).

What a retry must not do is run a trial twice or lose one, when the server committed a write but
the reply was lost with the connection:
- a new trial carries a token (system attribute `nas:created`); a retried creation first looks
  for a trial with its token and returns that one instead of creating another;
- a retried state change that finds the state already set reports success (Optuna would raise
  "trial already finished" and fail the worker);
- after an outage, every worker's heartbeats were silent too: this process does not fail other
  workers' trials as stale until GRACE_S after its own outage ended (they beat again by then).

Retries apply to server storages only: SQLite is a local file, whose errors are not passing.
`STATS` counts the time spent in storage calls (the time a worker waited on the database);
NAS_STORAGE_STATS=FOLDER writes them as JSON per process at exit (experiments/benchmarks/pg_load.py).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from optuna.storages import RDBStorage
from optuna.storages._rdb import models  # the one create attempt below: Optuna's own steps
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import exc as sa_exc

from nas.search.settings import STORAGE_RETRY_S

BACKOFF_FIRST_S = 0.25  # first wait after a lost connection; doubled each time
BACKOFF_MAX_S = 4.0  # the longest wait between two attempts (heartbeats resume within it)
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, the user is invited to retry
TOKEN = "nas:created"  # system attribute of a trial: which call created it (see the docstring)


def worker_host() -> str:
    """This worker's machine, as recorded on its trials. NAS_WORKER_HOST overrides the hostname
    where hostnames are not unique across the machines sharing a storage (e.g. containers)."""
    return os.environ.get("NAS_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    return f"{worker_host()}:{os.getpid()}"


class StorageUnavailable(Exception):
    """The storage server was unreachable for longer than the retry window."""


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a lost or refused connection, not a bad query."""
    seen: BaseException | None = exc
    for _ in range(8):  # Optuna wraps SQLAlchemy's error in StorageInternalError
        if seen is None:
            return False
        if isinstance(seen, sa_exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return True
        if type(seen).__module__.startswith("psycopg") and type(seen).__name__ == "OperationalError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Stats:
    """Seconds spent inside storage calls, by the main thread (what blocks the search) and by all
    threads (heartbeats and the progress display too); retries and outage seconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.main_s = self.all_s = self.max_call_s = self.outage_s = 0.0
        self.calls = self.retries = 0

    def add(self, seconds: float, retries: int, outage: float) -> None:
        with self.lock:
            self.calls += 1
            self.all_s += seconds
            self.max_call_s = max(self.max_call_s, seconds)
            self.retries += retries
            self.outage_s += outage
            if threading.current_thread() is threading.main_thread():
                self.main_s += seconds

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items() if k != "lock"}


STATS = Stats()


def _write_stats() -> None:
    folder = os.environ.get("NAS_STORAGE_STATS")
    if folder and STATS.calls:
        path = Path(folder) / f"{worker_id().replace(':', '-')}.json"
        path.write_text(json.dumps({"worker": worker_id(), **STATS.as_dict()}) + "\n")


atexit.register(_write_stats)


class RetryingStorage(RDBStorage):
    """RDBStorage that waits out a lost server (module docstring). `retry_s` 0: no retries."""

    def __init__(self, url: str, retry_s: float = STORAGE_RETRY_S, grace_s: float = 0.0, **kwargs):
        self.retry_s = retry_s
        self.grace_s = grace_s  # no stale trials of others this long after an outage of ours
        self.gone: StorageUnavailable | None = None
        self._outage_ended = -1e9  # time.monotonic() when the last outage ended
        self._local = threading.local()  # depth of nested retried calls on this thread
        kwargs.setdefault("engine_kwargs", {"pool_pre_ping": True})
        super().__init__(url, **kwargs)

    def _call(self, name: str, call: Callable[[int], Any]) -> Any:
        """`call(attempt)` until it returns, retrying lost connections for `retry_s` seconds."""
        if getattr(self._local, "depth", 0):  # an outer retried call covers this one
            return call(0)
        if self.gone is not None:
            raise self.gone
        self._local.depth = 1
        start = time.monotonic()
        attempt, wait, outage_from = 0, BACKOFF_FIRST_S, None
        try:
            while True:
                try:
                    result = call(attempt)
                except Exception as exc:
                    if not connection_lost(exc) or self.retry_s <= 0:
                        raise
                    now = time.monotonic()
                    outage_from = now if outage_from is None else outage_from
                    if now - outage_from >= self.retry_s:
                        first = str(exc.__cause__ or exc).strip().splitlines()[0][:200]
                        self.gone = StorageUnavailable(
                            f"storage {self.url_for_humans()}: unreachable for {now - outage_from:.0f} s"
                            f" (--storage-retry-s {self.retry_s:g}; {name}: {first})"
                        )
                        raise self.gone from None
                    time.sleep(min(wait, self.retry_s - (now - outage_from)) * random.uniform(0.8, 1.0))
                    wait = min(wait * 2, BACKOFF_MAX_S)
                    attempt += 1
                    continue
                if outage_from is not None:
                    self._outage_ended = time.monotonic()
                return result
        finally:
            self._local.depth = 0
            end = time.monotonic()
            STATS.add(end - start, attempt, 0.0 if outage_from is None else end - outage_from)

    def __getstate__(self) -> dict[str, Any]:  # pickled to Ray's workers: no thread-local state
        state = super().__getstate__()
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._local = threading.local()

    def url_for_humans(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    # ---- the calls that must not act twice ----------------------------------------------------

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        token = uuid.uuid4().hex
        if template_trial is None:  # what RDBStorage creates without a template, plus the token
            template_trial = FrozenTrial(
                number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                intermediate_values={}, trial_id=-1,
            )  # fmt: skip
        template = _with_token(template_trial, token)

        def call(attempt: int) -> FrozenTrial:
            if attempt:
                for trial in super(RetryingStorage, self)._get_trials(study_id, None, set(), -1):
                    if trial.system_attrs.get(TOKEN) == token:
                        return trial  # the lost reply's trial: created once
            return self._create_once(study_id, template)

        return self._call("create trial", call)

    def _create_once(self, study_id: int, template: FrozenTrial) -> FrozenTrial:
        """RDBStorage._create_new_trial's one attempt: its own loop retries a lost connection
        (meant for deadlocks, which roll back) without looking for the token, so a reply lost
        after the commit would create the trial twice there."""
        with _create_scoped_session(self.scoped_session) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
            trial = self._get_prepared_new_trial(study_id, template, session)
            frozen = copy.deepcopy(template)
            frozen.number = trial.number
            frozen.datetime_start = trial.datetime_start
            frozen._trial_id = trial.trial_id
            return frozen

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        set_state = super().set_trial_state_values

        def call(attempt: int) -> bool:
            if attempt and state.is_finished():
                trial = super(RetryingStorage, self).get_trial(trial_id)
                if trial.state == state and (values is None or list(trial.values or []) == list(values)):
                    return True  # the lost reply's update went through
            return set_state(trial_id, state, values)

        return self._call("set trial state", call)

    def record_heartbeat(self, trial_id: int) -> None:
        # a thread of its own: the search's main thread reports an outage
        with contextlib.suppress(StorageUnavailable):
            self._call("heartbeat", lambda attempt: super(RetryingStorage, self).record_heartbeat(trial_id))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if time.monotonic() - self._outage_ended < self.grace_s:
            return []  # every worker's heartbeats were cut off by the outage too
        return self._call(
            "stale trials", lambda attempt: super(RetryingStorage, self)._get_stale_trial_ids(study_id)
        )


def _with_token(trial: FrozenTrial, token: str) -> FrozenTrial:
    trial = copy.deepcopy(trial)
    trial.system_attrs = {**trial.system_attrs, TOKEN: token}
    return trial


def _retried(name: str) -> Callable:
    def wrapper(self: RetryingStorage, *args, **kwargs):
        return self._call(name, lambda attempt: getattr(RDBStorage, name)(self, *args, **kwargs))

    wrapper.__name__ = name
    wrapper.__doc__ = getattr(RDBStorage, name).__doc__
    return wrapper


# Every other call that reaches the server (what Optuna's _CachedStorage and our code call).
for _name in (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "_set_trial_param",
    "get_trial_param", "get_trial_id_from_study_id_trial_number", "_get_best_trial_id",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_user_attrs", "get_trial_system_attrs", "get_trial", "_get_trials",
):  # fmt: skip
    setattr(RetryingStorage, _name, _retried(_name))


class _QuietLostConnection(logging.Filter):
    """Optuna's RDBStorage logs a failed trial listing ("Caught an error from sqlalchemy ...
    Falling back to a slower alternative") before retrying it in another way; for a lost
    connection that is noise: the retry above handles it, and an outage ends in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Falling back to a slower alternative" not in message:
            return True
        return not any(k in message for k in ("connection", "server closed", "terminating", "refused"))


logging.getLogger("optuna.storages._rdb.storage").addFilter(_QuietLostConnection())
