"""A flaky PostgreSQL server under `nas search --workers 3` (issue 29.5), on a throwaway server of
this module's own (tests/fixtures/postgres.py; restarting the session's would disturb other
tests): `pg_ctl restart` mid-search is waited out (the exact count, no trial lost, none run
twice); a server gone longer than --storage-retry-s stops every worker with one line and exit
code 75, and the same command resumes once the server is back. Real `nas search` processes and
real trials (tiny space, 12 proxy steps). Every wait is for a state, bounded only against hangs."""

import os
import re
import subprocess
import sys
import time
from datetime import datetime

import optuna
import pytest
from optuna.trial import TrialState

from nas.search.retry import EXIT_TEMPFAIL
from nas.search.storage import counted
from tests.fixtures.postgres import ThrowawayPostgres, _as_server_user, _unavailable, create_database

HANG = 1200  # seconds: only a hung process ever gets near this, however loaded the machine

pytestmark = pytest.mark.slow  # reason: 3 worker processes each import torch and train; 70-200 s each


class Server:
    """A throwaway server that the test may restart, stop and start again."""

    def __init__(self, pg: ThrowawayPostgres, url: str):
        self.pg, self.url = pg, url
        self.port = int(url.rsplit(":", 1)[1])

    def _ctl(self, *args: str) -> None:
        cmd = [
            self.pg.pg_ctl,
            "-D",
            str(self.pg.data),
            "-l",
            str(self.pg.root / "log"),
            "-w",
            "-t",
            "120",
            *args,
        ]
        subprocess.run(_as_server_user(cmd), check=True, capture_output=True, cwd=self.pg.root, timeout=HANG)

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")  # the options of the first start (postmaster.opts)

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.pg.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl("-o", options, "start")


@pytest.fixture(scope="module")
def own_server():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed")
    pg = ThrowawayPostgres()
    try:
        url = pg.__enter__()
    except RuntimeError as exc:
        _unavailable(str(exc))
    try:
        yield Server(pg, url)
    finally:
        pg.__exit__()


def _search(space, cache, results, url, trials, *extra):
    return [sys.executable, "-m", "nas", "search", str(space), "--study", "pg", "--trials", str(trials),
            "--storage", url, "--cache", str(cache), "--results", str(results), "--sampler", "random",
            "--workers", "3", "--quiet", *extra]  # fmt: skip


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="pg", storage=url).get_trials()
    except Exception:  # not created yet, or the server restarting
        return []


def _wait_until(proc: subprocess.Popen, url: str, ready) -> list[optuna.trial.FrozenTrial]:
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline and proc.poll() is None:
        trials = _trials(url)
        if ready(trials):
            return trials
        time.sleep(0.2)
    raise AssertionError(f"the search never got there (exit {proc.poll()})")


def _running(trials) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.RUNNING and "arch" in t.user_attrs]


def _workers(trials) -> set[str]:
    return {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}


def test_a_server_restart_mid_search_is_waited_out(own_server, search_cache, space_file, tmp_path):
    url = create_database(own_server.url)
    space = space_file("pg")
    proc = subprocess.Popen(_search(space, search_cache, tmp_path / "r", url, 9), env=_env(),
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_until(proc, url, lambda ts: any(t.state == TrialState.COMPLETE for t in ts) and _running(ts))
    restarted = datetime.now()
    own_server.restart()
    _, err = proc.communicate(timeout=HANG)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "exited with errors" not in err, err[-3000:]

    trials = _trials(url)
    assert [t.number for t in trials] == list(range(9))  # none created twice
    assert sum(counted(t) for t in trials) == 9  # exactly --trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)  # none lost
    assert not [t for t in trials if "error" in t.user_attrs or "retry_of" in t.user_attrs]  # none rerun
    across = [t for t in trials if t.datetime_start < restarted < t.datetime_complete]
    assert across, "no trial was running through the restart"


def test_a_server_gone_too_long_stops_each_worker_in_one_line_then_resumes(
    own_server, search_cache, space_file, tmp_path
):
    url = create_database(own_server.url)
    space = space_file("pg")
    argv = _search(space, search_cache, tmp_path / "r", url, 24, "--storage-retry-s", "5")
    proc = subprocess.Popen(argv, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_until(proc, url, lambda ts: len(_workers(ts)) == 3 and _running(ts))  # every worker in
    own_server.stop()
    try:
        _, err = proc.communicate(timeout=HANG)
    finally:
        own_server.start()
    assert proc.returncode == EXIT_TEMPFAIL, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("nas search:")]  # (and LoadWarnings)
    assert "Traceback" not in err and len(lines) == 3, err[-3000:]  # one line per worker
    pattern = r"nas search: worker (\S+): storage postgresql\+psycopg://nas:\*\*\*@127\.0\.0\.1:\d+/\w+: unreachable for \d+ s \(--storage-retry-s 5; .*\); rerun the same command to resume"  # fmt: skip
    assert len({re.match(pattern, line).group(1) for line in lines}) == 3, lines  # type: ignore[union-attr]

    before = _trials(url)
    lost = _running(before)
    assert lost and len(before) < 24
    resumed = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=HANG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _trials(url)
    assert sum(counted(t) for t in trials) == 24
    for t in before:  # what finished before stays as it was
        if t.state.is_finished():
            assert trials[t.number].state == t.state and trials[t.number].values == t.values
    for t in lost:  # the trials cut off by the outage: failed and rerun once, same parameters
        assert trials[t.number].state == TrialState.FAIL and "error" not in trials[t.number].user_attrs
        reruns = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(reruns) == 1 and reruns[0].params == t.params and counted(reruns[0])
    assert not [t for t in trials if "error" in t.user_attrs]
