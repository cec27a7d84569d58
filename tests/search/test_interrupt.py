"""Ctrl-C and SIGTERM in a search mean what a kill means (the running trials are failed and
re-enqueued with exactly their parameters, exit 130 / 143 with the command that resumes), resumed
and parallel workers never replay draws, an architecture is measured once, and the search that
started extra workers prints their trials. Points come from the `synthetic` stand-in
(tests/fixtures/search.py), in subprocesses through tests/search/synthetic_cli.py."""

import os
import shlex
import signal

import optuna
import pytest
from optuna.trial import TrialState

import nas.search.study as study_module
from nas.cli import main
from nas.search.export import pick_trial
from nas.search.storage import arch_key, counted, retry_lost_trial, sampler_seed
from nas.search.study import SearchSettings, load_study, run_search
from tests.fixtures.search import synthetic_point


def _argv(space, study, cache, results, trials, *extra, workers=1):
    # in the field order of the settings: what `to_argv` writes back in the resume hint
    more = ["--sampler", "random"] + (["--workers", str(workers)] if workers > 1 else [])
    return ["search", str(space), "--study", study, "--trials", str(trials), "--cache", str(cache),
            *more, "--results", str(results), *extra]  # fmt: skip


def _settings(space, study, cache, tmp, trials, **kw):
    return SearchSettings(space=str(space), study=study, trials=trials, cache=str(cache),
                          results=str(tmp / "results"), **kw)  # fmt: skip


def _measured_twice(trials) -> list[str]:
    """Architectures measured by more than one trial (duplicates pruned unmeasured aside)."""
    keys = [
        arch_key(t.user_attrs["arch"])
        for t in trials
        if counted(t) and "arch" in t.user_attrs and "duplicate_of" not in t.user_attrs
    ]
    return sorted({k for k in keys if keys.count(k) > 1})


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_in_the_baseline_trial_retries_it_and_the_hint_resumes(
    sig, code, synthetic, table_space, search_cache, memory_tmp, monkeypatch, capsys
):
    space, results = table_space("sig"), memory_tmp / "results"
    before = signal.getsignal(sig)
    calls = []

    def evaluate(space, arch, *args, **kwargs):
        calls.append(arch.name)
        if len(calls) == 1:  # trial 0, the baseline (enqueued first), mid-evaluation
            assert signal.getsignal(sig) != before, "run_search installed no handler"  # or this kills pytest
            os.kill(os.getpid(), sig)  # the handler raises here
            raise AssertionError("the signal did not stop the trial")
        return synthetic_point(space, arch, *args, **kwargs)

    monkeypatch.setattr(study_module, "evaluate_point", evaluate)
    argv = _argv(space, "b", search_cache, results, 4, "--quiet")
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    name = signal.Signals(sig).name
    assert len(err) == 1, err  # one line, no traceback, no Optuna warning
    assert err[0].startswith(f"nas search: interrupted by {name}; trial 0 failed and re-enqueued to run first; resume with: nas search ")  # fmt: skip
    hinted = shlex.split(err[0].split("resume with: ", 1)[1])
    assert hinted == ["nas", *argv]  # the same flags: study, space, cache, results
    assert signal.getsignal(sig) == before  # handlers restored

    trials = load_study("b", results=str(results)).get_trials()
    lost = trials[0]
    assert lost.state == TrialState.FAIL and lost.user_attrs["interrupted"] == name
    assert "error" not in lost.user_attrs and not counted(lost)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert [t.user_attrs["retry_of"] for t in waiting] == [0]
    # the baseline keeps its name, and an interrupt does not use up one of the kill retries
    assert (
        waiting[0].user_attrs["baseline"] == lost.user_attrs["baseline"]
        and waiting[0].user_attrs["retries"] == 0
    )
    assert waiting[0].system_attrs["fixed_params"] == lost.params

    assert main(hinted[1:]) == 0  # the hinted command resumes
    study = load_study("b", results=str(results))
    trials = study.get_trials()
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.number == 1 and retry.state == TrialState.COMPLETE  # retried first, and measured
    assert retry.params == lost.params and retry.user_attrs["baseline"] == lost.user_attrs["baseline"]
    assert sum(counted(t) for t in trials) == 4
    picked = pick_trial(study, "latency_ms<=1*baseline")  # before the fix: no completed baseline
    assert picked.user_attrs["latency_ms_p50"] <= retry.user_attrs["latency_ms_p50"]


def test_a_baseline_interrupted_while_choosing_is_retried_from_its_enqueued_params(tmp_path):
    study = optuna.create_study(study_name="e", storage=f"sqlite:///{tmp_path / 'e.db'}")
    # a sampled trial lost while choosing holds no point: nothing to retry
    trial = study.ask()
    trial.suggest_int("depth", 1, 2)
    study.tell(trial, state=TrialState.FAIL)
    assert retry_lost_trial(study, study.get_trials()[0], interrupted=True) is None
    # an enqueued one (a baseline) is its enqueued parameters from the start
    params = {"depth": 1, "l0.channels": 16}
    study.enqueue_trial(params, user_attrs={"baseline": "stock"})
    trial = study.ask()
    trial.suggest_int("depth", 1, 2)  # one of two parameters chosen, no `arch` attribute yet
    study.tell(trial, state=TrialState.FAIL)
    assert retry_lost_trial(study, study.get_trials()[1], interrupted=True) == 1
    retry = study.get_trials()[2]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == params
    assert retry.user_attrs == {"retry_of": 1, "retries": 0, "baseline": "stock"}


def test_sampler_seed_differs_per_rank_and_attempt():
    assert sampler_seed(3, "s", 0, 0) == 3  # a new study's first worker draws what --seed drew
    seeds = {sampler_seed(3, "s", rank, attempt) for rank in range(4) for attempt in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**32 for s in seeds)
    assert sampler_seed(3, "s", 1, 5) != sampler_seed(3, "t", 1, 5) != sampler_seed(4, "s", 1, 5)


def test_a_resumed_worker_draws_new_points(synthetic, table_space, search_cache, memory_tmp):
    """Before: the resumed worker reseeded with --seed and the random sampler drew trials 1-3's
    architectures again as trials 4-6."""
    space = table_space("again")
    run_search(_settings(space, "r", search_cache, memory_tmp, 4, sampler="random"), quiet=True)
    study = run_search(_settings(space, "r", search_cache, memory_tmp, 8, sampler="random"), quiet=True)
    trials = study.get_trials()
    assert len(trials) == 8 and not [t.number for t in trials if "duplicate_of" in t.user_attrs]
    assert _measured_twice(trials) == []


def test_an_architecture_already_measured_is_pruned_as_duplicate(
    synthetic, table_space, search_cache, memory_tmp, monkeypatch
):
    """Replaying draws on purpose (every start seeded with --seed, as before): the replayed
    points are recorded as duplicates, never evaluated, and count toward --trials."""
    from nas.search.storage import SAMPLERS

    def replay(study, settings, multi, rank):
        study.sampler = SAMPLERS[settings.sampler](settings.seed, multi)
        return settings.seed

    monkeypatch.setattr(study_module, "seed_sampler", replay)
    evaluated = []

    def evaluate(space, arch, *args, **kwargs):
        evaluated.append(arch.name)
        return synthetic_point(space, arch, *args, **kwargs)

    monkeypatch.setattr(study_module, "evaluate_point", evaluate)
    space = table_space("dup")
    run_search(_settings(space, "d", search_cache, memory_tmp, 4, sampler="random"), quiet=True)
    study = run_search(_settings(space, "d", search_cache, memory_tmp, 7, sampler="random"), quiet=True)
    trials = study.get_trials()
    assert len(trials) == 7 and sum(counted(t) for t in trials) == 7
    for t, original in zip(trials[4:], trials[1:4], strict=True):
        assert t.state == TrialState.PRUNED and t.user_attrs["duplicate_of"] == original.number
        assert (
            t.user_attrs["rejected"] == "duplicate"
            and t.user_attrs["reason"] == f"duplicate of trial {original.number}"
        )
        assert t.params == original.params and f"d-t{t.number}" not in evaluated
    assert len(evaluated) == 4 and _measured_twice(trials) == []


def test_sigterm_stops_every_worker_and_the_resume_measures_nothing_twice(
    synthetic, table_space, search_cache, memory_tmp, repo_root, monkeypatch, capfd
):
    """`--workers 2`: this process is the search (in-process, so that only the extra worker pays
    a process start), its worker a real process (tests/search/synthetic_cli.py). SIGTERM when
    both hold a trial; then the hinted command, with every worker given a trial."""
    from tests.search import synthetic_cli

    space, results = table_space("workers"), memory_tmp / "results"
    url = f"sqlite:///{results / 'w' / 'study.db'}"
    monkeypatch.setattr(study_module, "WORKER_MODULE", "tests.search.synthetic_cli")
    monkeypatch.setenv("PYTHONPATH", str(repo_root))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("NAS_TEST_PEER_COUNT", "2")
    for run in ("held", "resumed"):
        (memory_tmp / run).mkdir()

    def sigterm_once_both_hold(space, arch, *args, **kwargs):
        synthetic_cli.wait_for_peers()  # the worker holds a trial too (its architecture chosen)
        os.kill(os.getpid(), signal.SIGTERM)  # to the search only: it stops its worker itself
        raise AssertionError("the signal did not stop the trial")

    monkeypatch.setattr(study_module, "evaluate_point", sigterm_once_both_hold)
    monkeypatch.setenv("NAS_TEST_PEERS", str(memory_tmp / "held"))
    monkeypatch.setenv("NAS_TEST_HOLD", "1")  # the worker's trial waits for the signal
    argv = _argv(space, "w", search_cache, results, 6, workers=2)
    assert main(argv) == 143
    out, err = capfd.readouterr()  # this process's and its worker's
    assert "Traceback" not in err and "failed with" not in err, err[-3000:]
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("nas search: interrupted by SIGTERM; trials 0, 1 failed and re-enqueued"), err[
        -3000:
    ]
    trials = optuna.load_study(study_name="w", storage=url).get_trials()
    held = trials[:2]
    assert len({t.user_attrs["worker"] for t in held}) == 2  # this process's trial and its worker's
    for t in held:  # both failed, retried with exactly their parameters
        assert t.state == TrialState.FAIL and t.user_attrs["interrupted"] == "SIGTERM"
        retry = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.WAITING
        assert retry[0].system_attrs["fixed_params"] == t.params

    hinted = shlex.split(hint.split("resume with: ", 1)[1])
    assert hinted == ["nas", *argv]
    monkeypatch.setattr(study_module, "evaluate_point", synthetic_cli.evaluate)
    monkeypatch.setenv("NAS_TEST_PEERS", str(memory_tmp / "resumed"))
    monkeypatch.delenv("NAS_TEST_HOLD")
    assert main(hinted[1:]) == 0
    out, err = capfd.readouterr()
    assert "extra local workers exited with errors" not in err, err[-3000:]
    trials = optuna.load_study(study_name="w", storage=url).get_trials()
    assert sum(counted(t) for t in trials) == 6 and _measured_twice(trials) == []
    for t in held:
        retry = next(r for r in trials if r.user_attrs.get("retry_of") == t.number)
        assert retry.state == TrialState.COMPLETE
    resumed = trials[2:]
    others = [t for t in resumed if t.user_attrs["worker"].rsplit(":", 1)[1] != str(os.getpid())]
    assert others, "the extra worker ran no trial"
    shown = {int(line.split()[1]) for line in out.splitlines() if line.startswith("trial ")}
    assert {t.number for t in resumed} == shown  # every worker's trials, once each
