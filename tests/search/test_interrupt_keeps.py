"""Ctrl-C in a search after some trials finished (issue 29.4, the search side): the running trial
is retried exactly on resume, and no completed trial is lost, changed or measured again.
(tests/search/test_interrupt.py interrupts the first trial, and every worker's first trials.)"""

import os
import shlex
import signal

from optuna.trial import TrialState

import nas.search.study as study_module
from nas.cli import main
from nas.search.storage import counted
from nas.search.study import load_study
from tests.fixtures.search import synthetic_point


def test_ctrl_c_after_two_trials_keeps_them_and_retries_the_third(
    synthetic, table_space, search_cache, memory_tmp, monkeypatch, capsys
):
    space, results = table_space("keep"), memory_tmp / "results"
    evaluated: list[str] = []

    def evaluate(space, arch, *args, **kwargs):
        evaluated.append(arch.name)
        if len(evaluated) == 3:  # trial 2, mid-evaluation
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("the signal did not stop the trial")
        return synthetic_point(space, arch, *args, **kwargs)

    monkeypatch.setattr(study_module, "evaluate_point", evaluate)
    argv = ["search", str(space), "--study", "k", "--trials", "5", "--cache", str(search_cache),
            "--sampler", "random", "--results", str(results), "--quiet"]  # fmt: skip
    assert main(argv) == 130
    hint = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trial 2 failed and re-enqueued to run first" in hint
    before = load_study("k", results=str(results)).get_trials()
    assert [t.state for t in before[:3]] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]

    evaluated.clear()
    monkeypatch.setattr(study_module, "evaluate_point", lambda *a, **k: evaluated.append(a[1].name) or synthetic_point(*a, **k))  # fmt: skip
    assert main(shlex.split(hint.split("resume with: ", 1)[1])[1:]) == 0
    after = load_study("k", results=str(results)).get_trials()
    for old, new in zip(before[:2], after[:2], strict=True):  # kept as they were, not measured again
        assert (new.state, new.values, new.params, new.datetime_complete) == (
            old.state,
            old.values,
            old.params,
            old.datetime_complete,
        )
    assert not {"keep-t0", "keep-t1", "k-t0", "k-t1"} & set(evaluated)
    retry = next(t for t in after if t.user_attrs.get("retry_of") == 2)
    assert retry.number == 3 and retry.params == before[2].params and retry.state == TrialState.COMPLETE
    assert sum(counted(t) for t in after) == 5 and evaluated[0] == "k-t3"  # the retry ran first


def test_a_surplus_trial_is_not_logged_as_a_failure(caplog):
    """A trial that gives way at the end of a multi-worker search (Surplus) is expected: Optuna's
    failure warning with its traceback, and its 'failed with value None' line, are dropped; an
    architecture's error is still logged."""
    import logging

    from nas.search.study import quiet_surplus

    quiet_surplus()
    logger = logging.getLogger("optuna.study._optimize")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "Trial 9 failed with parameters: {} because of the following error: Surplus('9 trials')."
        )
        logger.warning("Trial 9 failed with value None.")
        logger.warning("Trial 3 failed with parameters: {} because of the following error: ValueError('x').")
    assert [r.getMessage() for r in caplog.records] == [
        "Trial 3 failed with parameters: {} because of the following error: ValueError('x')."
    ]
