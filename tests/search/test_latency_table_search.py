"""Every sampler x every pruner through `run_search`: each completes and records its trials with the
right states, pruners prune single-objective studies only, a seed fixes a sampler's sequence of
architectures. The engine (study, sampler, pruner, states, storage) is real; the point evaluation
is the `synthetic` fixture's deterministic stand-in (tests/fixtures/search.py) so that the whole
table runs in seconds and pruning decisions do not depend on training noise. Real training through the same path: tests/search/test_search.py."""

import optuna
import pytest
from optuna.trial import TrialState

from nas.search.storage import SAMPLERS
from nas.search.study import SearchSettings, run_search

PRUNERS = {  # the space's proxy.pruner -> the Optuna class open_study must give single-objective studies
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
STEPS, EVERY = 8, 2  # synthetic proxy: 4 reports a trial
TRIALS = 8  # > the 5 startup trials of tpe and gp: their models pick the last 3


def test_tables_cover_the_schema():
    from typing import get_args

    from nas.space.schema import ProxySetup

    assert set(PRUNERS) == set(get_args(ProxySetup.model_fields["pruner"].annotation))
    assert set(SAMPLERS) == set(get_args(SearchSettings.model_fields["sampler"].annotation))


def search(space, study, cache, tmp_path, sampler, seed=0, trials=TRIALS):
    s = SearchSettings(space=str(space), study=study, trials=trials, cache=str(cache),
                       results=str(tmp_path / "results"), sampler=sampler, seed=seed)  # fmt: skip
    return run_search(s, quiet=True)


def check_states(study, steps):
    """Counted trials only; a PRUNED trial was rejected by a budget (never trained) or pruned at a
    report before the last step; a COMPLETE one reported every step."""
    trials = study.get_trials()
    assert len(trials) == TRIALS and trials[0].user_attrs["baseline"] == "tiny_stock"
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["latency_source"] == "table" and "proxy_loss" in t.user_attrs
            if len(study.directions) == 1:
                assert sorted(t.intermediate_values) == list(range(EVERY, steps + 1, EVERY))
        elif "rejected" not in t.user_attrs:
            assert t.user_attrs["reason"].startswith("pruned at step")
            assert max(t.intermediate_values) < steps and "proxy_loss" not in t.user_attrs
    return trials


@pytest.mark.parametrize("pruner", list(PRUNERS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_x_pruner_single_objective(sampler, pruner, synthetic, table_space, search_cache, memory_tmp):
    space = table_space(f"{sampler}-{pruner}", steps=STEPS, objectives=[{"metric": "proxy_loss"}],
                        proxy={"pruner": pruner, "report_every": EVERY})  # fmt: skip
    study = search(space, "s", search_cache, memory_tmp, sampler)
    assert type(study.pruner) is PRUNERS[pruner] and len(study.directions) == 1
    trials = check_states(study, STEPS)
    pruned = [t for t in trials if t.state == TrialState.PRUNED and "rejected" not in t.user_attrs]
    if pruner == "none":
        assert pruned == []
    if pruner == "successive_halving":  # rung 0 (step 2) of < 8 trials keeps only the best so far
        for t in trials[1:7]:
            best_before = min(u.intermediate_values[EVERY] for u in trials[: t.number])
            assert (t in pruned) == (t.intermediate_values[EVERY] > best_before)
    assert study.best_value == min(t.value for t in trials if t.state == TrialState.COMPLETE)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask() below, outside optimize
@pytest.mark.parametrize("pruner", [p for p in PRUNERS if p != "none"])
def test_multi_objective_studies_are_never_pruned(pruner, synthetic, table_space, search_cache, memory_tmp):
    """Optuna's Trial.report raises in multi-objective studies: nas trains every feasible point to
    its full budget (NopPruner), whatever the space's pruner says."""
    space = table_space(f"multi-{pruner}", steps=STEPS, proxy={"pruner": pruner, "report_every": EVERY})
    study = search(space, "m", search_cache, memory_tmp, "random")
    assert len(study.directions) == 2 and isinstance(study.pruner, optuna.pruners.NopPruner)
    trials = check_states(study, STEPS)
    assert all(t.state == TrialState.COMPLETE and t.intermediate_values == {} for t in trials)
    assert all(t.user_attrs["last_step"] == STEPS for t in trials)
    with pytest.raises(NotImplementedError):  # why: Optuna refuses, so nas must not report
        study.ask().report(1.0, 1)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_seed_fixes_the_sequence_of_architectures(sampler, synthetic, table_space, search_cache, memory_tmp):
    space = table_space(f"seed-{sampler}", steps=STEPS, proxy={"report_every": EVERY})
    runs = [
        search(space, f"r{i}", search_cache, memory_tmp, sampler, seed=seed, trials=6)
        for i, seed in enumerate((3, 3, 4))
    ]
    archs = [[tuple(sorted(t.params.items())) for t in study.get_trials()] for study in runs]
    assert archs[0] == archs[1]  # same seed: the same architectures in the same order
    assert archs[0] != archs[2]  # another seed: another sequence
    assert len(set(archs[0])) > 3  # not stuck on one point
