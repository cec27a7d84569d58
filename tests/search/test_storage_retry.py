"""nas/search/retry.py without a server: lost connections are retried with backoff for the window,
then one StorageUnavailable and every later call fails at once; a write whose reply was lost is
not done twice (a trial created once, a state set once). The connection is cut by raising what
SQLAlchemy raises for it; tests/search/test_pg_faults.py restarts and stops a real server."""

import time

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import IntegrityError, OperationalError

import nas.search.retry as retry
from nas.search.retry import TOKEN, RetryingStorage, StorageUnavailable, connection_lost

LOST = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


@pytest.fixture
def storage(tmp_path, monkeypatch):
    monkeypatch.setattr(retry, "BACKOFF_FIRST_S", 0.01)
    monkeypatch.setattr(retry, "BACKOFF_MAX_S", 0.05)
    return RetryingStorage(f"sqlite:///{tmp_path / 's.db'}", retry_s=1.0)


def cut(monkeypatch, name: str, times: int, after=None, cls=optuna.storages.RDBStorage):
    """cls.`name` raises a lost connection `times` times (`after`: once its work is done, as
    when the reply is lost after the commit), then works."""
    original = getattr(cls, name)
    calls = []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            if after:
                original(self, *args, **kwargs)
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit."
            ) from LOST
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, flaky)
    return calls


def test_what_counts_as_a_lost_connection():
    assert connection_lost(LOST)
    try:
        raise optuna.exceptions.StorageInternalError("wrapped") from LOST
    except optuna.exceptions.StorageInternalError as exc:
        assert connection_lost(exc)
    assert not connection_lost(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not connection_lost(ValueError("bad value"))


def test_a_short_outage_is_waited_out(storage, monkeypatch):
    study = optuna.create_study(storage=storage, study_name="s")
    calls = cut(monkeypatch, "get_all_studies", 3)
    start = time.monotonic()
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    assert len(calls) == 4 and time.monotonic() - start < 1.0 and storage.gone is None
    assert study.get_trials() == []


def test_an_outage_longer_than_the_window_stops_every_later_call_at_once(storage, monkeypatch):
    optuna.create_study(storage=storage, study_name="s")
    cut(monkeypatch, "get_all_studies", 10**6)
    start = time.monotonic()
    with pytest.raises(StorageUnavailable) as gone:
        storage.get_all_studies()
    assert 1.0 <= time.monotonic() - start < 2.0
    message = str(gone.value)
    assert "unreachable for 1 s (--storage-retry-s 1" in message and "\n" not in message
    start = time.monotonic()
    with pytest.raises(StorageUnavailable):
        storage.get_study_id_from_name("s")  # not cut, but the process has given up on the server
    assert time.monotonic() - start < 0.1
    storage.record_heartbeat(1)  # the heartbeat thread stays quiet: the main thread reports


def test_a_trial_whose_creation_reply_was_lost_is_created_once(storage, monkeypatch):
    study = optuna.create_study(storage=storage, study_name="s")
    calls = cut(monkeypatch, "_create_once", 1, after=True, cls=RetryingStorage)
    trial = study.ask()
    trials = study.get_trials()
    assert len(trials) == 1 and trials[0].number == trial.number == 0
    assert TOKEN in trials[0].system_attrs and len(calls) == 1  # found by its token, not created again
    study.enqueue_trial({"x": 1.0})  # a template (a waiting trial) carries one too, once
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]


def test_a_state_change_whose_reply_was_lost_is_not_an_error(storage, monkeypatch):
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    cut(monkeypatch, "set_trial_state_values", 1, after=True)
    study.tell(trial, 0.5)  # before: "trial already finished" on the retry
    (done,) = study.get_trials()
    assert done.state == TrialState.COMPLETE and done.value == 0.5


def test_no_stale_trials_right_after_an_outage(storage, monkeypatch):
    storage.grace_s = 30.0
    optuna.create_study(storage=storage, study_name="s")
    cut(monkeypatch, "get_all_studies", 1)
    storage.get_all_studies()  # an outage, ended now
    assert storage._get_stale_trial_ids(1) == []  # others' heartbeats were cut off too
