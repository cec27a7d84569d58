"""The search: Optuna engine end to end, failures, budgets, resume after SIGKILL, export, report."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.core.errors import NasError
from nas.search.study import SearchSettings, run_search


def settings(space, study, cache, tmp_path, trials=3, **kw):
    return SearchSettings(
        space=str(space),
        study=study,
        trials=trials,
        cache=str(cache),
        results=str(tmp_path / "results"),
        **kw,
    )


def test_search_records_every_figure_and_baseline_first(search_cache, space_file, tmp_path):
    s = settings(space_file(), "t", search_cache, tmp_path, trials=3)
    study = run_search(s, quiet=True)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[0].user_attrs["baseline"] == "tiny_stock"  # enqueued first
    for t in trials:
        a = t.user_attrs
        assert a["params"] > 0 and a["macs"] > a["attention_macs"] >= 0
        assert 0 < a["latency_ms_p50"] <= a["latency_ms_p90"]
        assert a["proxy_loss"] == pytest.approx(t.values[0]) and a["latency_ms_p50"] == pytest.approx(
            t.values[1]
        )
        assert "arch" in a
    folder = tmp_path / "results" / "t"
    assert {"study.db", "space.yaml", "search.json", "trials.csv"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "search.json").read_text())["settings"]["trials"] == 3
    # Rerunning with a larger count adds trials; finished ones are kept.
    study = run_search(settings(space_file(), "t", search_cache, tmp_path, trials=4), quiet=True)
    assert [t.values for t in study.get_trials()[:3]] == [t.values for t in trials]
    assert len(study.get_trials()) == 4


def test_failing_trial_is_recorded_and_study_goes_on(search_cache, space_file, tmp_path, monkeypatch):
    import nas.search.study as study_module

    real = study_module.evaluate_point
    calls = {"n": 0}

    def flaky(space, arch, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(space, arch, *args, **kwargs)

    monkeypatch.setattr(study_module, "evaluate_point", flaky)
    study = run_search(settings(space_file(), "f", search_cache, tmp_path, trials=3), quiet=True)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 2
    failed = next(t for t in study.get_trials() if t.state == TrialState.FAIL)
    assert "out of memory" in failed.user_attrs["error"]


def test_budgets_reject_before_training(search_cache, space_file, tmp_path):
    space = space_file("budget", budgets={"params": 150_000})
    study = run_search(settings(space, "b", search_cache, tmp_path, trials=4), quiet=True)
    for t in study.get_trials():
        if t.user_attrs["params"] > 150_000:
            assert t.state == TrialState.PRUNED and "params" in t.user_attrs["reason"]
            assert "proxy_loss" not in t.user_attrs  # never trained
        else:
            assert t.state == TrialState.COMPLETE


def test_budgets_that_exclude_everything_fail_before_any_trial(search_cache, space_file, tmp_path):
    space = space_file("impossible", budgets={"params": 1000})
    with pytest.raises(NasError, match="budgets exclude every architecture"):
        run_search(settings(space, "x", search_cache, tmp_path), quiet=True)
    assert not (tmp_path / "results" / "x" / "study.db").exists()


def test_single_objective_study_prunes(search_cache, space_file, tmp_path):
    proxy = {"steps": 12, "report_every": 4, "recipe": "tiny", "pruner": "median",
             "overrides": {"batch_size": 8, "val_items": 16, "val_timesteps": 2, "warmup_steps": 3}}  # fmt: skip
    space = space_file("single", objectives=[{"metric": "proxy_loss"}], proxy=proxy)
    study = run_search(settings(space, "s", search_cache, tmp_path, trials=5), quiet=True)
    assert len(study.directions) == 1
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert complete and all(sorted(t.intermediate_values) == [4, 8, 12] for t in complete)


def test_study_with_another_space_is_refused(search_cache, space_file, tmp_path):
    run_search(settings(space_file("a"), "shared", search_cache, tmp_path, trials=1), quiet=True)
    other = space_file("b", budgets={"params": 10_000_000})
    with pytest.raises(NasError, match=r"exists .* with another space"):
        run_search(settings(other, "shared", search_cache, tmp_path, trials=1), quiet=True)


def test_unreachable_storage(search_cache, space_file, tmp_path):
    s = settings(space_file(), "u", search_cache, tmp_path, storage="sqlite:////nonexistent/dir/x.db")
    with pytest.raises(NasError, match="cannot open"):
        run_search(s, quiet=True)


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--sampler", "grid", "allowed: tpe, nsga2, random, gp"), ("--backend", "dask", "allowed: optuna, ray")],
)
def test_unknown_sampler_or_backend_exit_2(capsys, search_cache, space_file, flag, value, needle):
    code = main(["search", str(space_file()), "--study", "z", "--cache", str(search_cache), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1


def _search_cmd(space, cache, results, trials):
    return [sys.executable, "-m", "nas", "search", str(space), "--study", "k", "--trials", str(trials),
            "--cache", str(cache), "--results", str(results), "--quiet"]  # fmt: skip


def test_sigkilled_search_resumes_to_full_count(search_cache, space_file, tmp_path):
    space = space_file("kill", proxy={"steps": 40, "report_every": 10, "recipe": "tiny",
                                      "overrides": {"batch_size": 8, "val_items": 16, "val_timesteps": 2}})  # fmt: skip
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_search_cmd(space, search_cache, results, 4), env=env, start_new_session=True)
    url = f"sqlite:///{results / 'k' / 'study.db'}"
    # Wait for a state, not a time: one trial completed and the next one training (its
    # architecture recorded). The deadline only stops a hung search; a loaded machine is slower.
    deadline = time.monotonic() + 900
    completed_before = []
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name="k", storage=url)
        except Exception:
            continue
        trials = study.get_trials()
        completed_before = [t for t in trials if t.state == TrialState.COMPLETE]
        if completed_before and any(t.state == TrialState.RUNNING and "arch" in t.user_attrs for t in trials):
            break
    assert proc.poll() is None, "the search ended before it could be killed mid-trial"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert completed_before, "no trial completed before the kill"
    running = [
        t.number
        for t in optuna.load_study(study_name="k", storage=url).get_trials()
        if t.state == TrialState.RUNNING
    ]
    assert running, "the kill should leave a running trial"

    subprocess.run(_search_cmd(space, search_cache, results, 4), env=env, check=True, timeout=1800)
    study = optuna.load_study(study_name="k", storage=url)
    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    for t in completed_before:  # completed trials are kept, untouched
        assert by_number[t.number].state == TrialState.COMPLETE and by_number[t.number].values == t.values
    for number in running:  # the interrupted trial failed and was retried with exactly its parameters
        lost = by_number[number]
        assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs
        retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and retries[0].params == lost.params
        arch, lost_arch = (dict(t.user_attrs["arch"], name=None) for t in (retries[0], lost))
        assert arch == lost_arch  # the same architecture under the retry's own name
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 4


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _lost_trial(study, space, n_params: int | None, worker: str):
    """A RUNNING trial as a killed worker leaves it: the first `n_params` parameters of an
    architecture chosen (all of them, and the `arch` attribute, when None)."""
    from nas.space import sample_arch

    class Partial:  # define-by-run chooser that dies after n_params choices
        def __init__(self, trial):
            self.trial, self.count = trial, 0

        def _tick(self):
            if n_params is not None and self.count == n_params:
                raise KeyboardInterrupt  # the kill
            self.count += 1

        def suggest_int(self, name, low, high):
            self._tick()
            return self.trial.suggest_int(name, low, high)

        def suggest_categorical(self, name, choices):
            self._tick()
            return self.trial.suggest_categorical(name, choices)

    trial = study.ask()
    trial.set_user_attr("worker", worker)
    try:
        arch = sample_arch(space, Partial(trial))
        trial.set_user_attr("arch", arch.to_data())
    except KeyboardInterrupt:
        pass
    return trial.number


@pytest.mark.parametrize("complete", [True, False], ids=["arch-chosen", "killed-while-choosing"])
def test_dead_local_trial_is_retried_only_with_a_whole_architecture(tmp_path, complete):
    import socket

    from nas.search.storage import fail_dead_local_trials
    from nas.space import load_space, sample_arch
    from tests.fixtures.space import SPACES

    space = load_space(SPACES / "tiny.yaml")
    study = optuna.create_study(study_name="d", storage=f"sqlite:///{tmp_path / 'd.db'}")
    number = _lost_trial(study, space, None if complete else 2, f"{socket.gethostname()}:{_dead_pid()}")
    lost = study.get_trials()[number]
    assert lost.state == TrialState.RUNNING and (len(lost.params) == 2) != complete

    assert fail_dead_local_trials(study) == [number]
    trials = study.get_trials()
    assert trials[number].state == TrialState.FAIL
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if complete:  # retried with exactly the lost trial's parameters
        assert len(waiting) == 1 and waiting[0].user_attrs["retry_of"] == number
        retry = study.ask()
        arch = sample_arch(space, retry, name=lost.user_attrs["arch"]["name"])
        assert retry.params == lost.params and arch.to_data() == lost.user_attrs["arch"]
    else:  # half-chosen: nothing to retry, the sampler draws a fresh point
        assert waiting == []
    assert fail_dead_local_trials(study) == []  # idempotent


def test_stale_trial_of_another_host_is_retried_by_heartbeat(tmp_path):
    """A worker on another machine (its pid means nothing here) is detected by its silent
    heartbeat; the storage's stale-trial callback retries it. Waits for a state, not a time."""
    from optuna.storages import RDBStorage

    from nas.search.storage import retry_lost_trial
    from nas.space import load_space
    from tests.fixtures.space import SPACES

    space = load_space(SPACES / "tiny.yaml")
    storage = RDBStorage(
        f"sqlite:///{tmp_path / 'h.db'}",
        heartbeat_interval=1,
        grace_period=1,
        heartbeat_stale_trial_callback=retry_lost_trial,
    )
    study = optuna.create_study(study_name="h", storage=storage)
    number = _lost_trial(study, space, None, "another-host:1")
    trial_id = study.get_trials()[number]._trial_id  # the heartbeat API takes storage ids
    storage.record_heartbeat(trial_id)
    deadline = time.monotonic() + 300
    while study.get_trials()[number].state == TrialState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.5)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert trials[number].state == TrialState.FAIL
    assert [t.user_attrs["retry_of"] for t in trials if t.state == TrialState.WAITING] == [number]
