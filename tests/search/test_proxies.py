"""Zero-cost proxies: one parametrized table, plus the pre-filter in a search."""

import math

import pytest
from optuna.trial import TrialState

from nas.data.cache import open_cache
from nas.search.objective import proxy_config
from nas.search.proxies import PROXIES, zero_cost_score
from nas.search.study import SearchSettings, run_search
from nas.space import load_arch, load_space
from tests.fixtures.space import ARCHS, SPACES


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_proxy_scores_are_finite_deterministic_and_architecture_dependent(search_cache, name):
    cache = open_cache(search_cache)
    config = proxy_config(load_space(SPACES / "tiny.yaml"), SPACES / "tiny.yaml")
    small, large = load_arch(ARCHS / "tiny_stock.yaml"), load_arch(ARCHS / "tiny_flex.yaml")
    a = zero_cost_score(name, small, cache, config, batch_size=4)
    again = zero_cost_score(name, small, cache, config, batch_size=4)
    b = zero_cost_score(name, large, cache, config, batch_size=4)
    assert math.isfinite(a) and a > 0 and a == pytest.approx(again)
    assert a != pytest.approx(b)


def test_zero_cost_prefilter_prunes_low_scores(search_cache, space_file, tmp_path, monkeypatch):
    """Scores fall with every call (10, 9, 8, ...) so the outcome is certain: trials 0 and 1 are the
    warm-up (fewer than 2 earlier scores); from trial 2 on each score is below the median (q0.5) of
    the earlier ones, so every later trial is pruned by the filter, before any training."""
    import nas.search.proxies
    import nas.train.loop

    scores = iter(range(10, 0, -1))
    monkeypatch.setattr(nas.search.proxies, "zero_cost_score", lambda *args, **kwargs: float(next(scores)))
    trained: list[str] = []
    real_train = nas.train.loop.proxy_train

    def counting_train(arch, *args, **kwargs):
        trained.append(arch.name)
        return real_train(arch, *args, **kwargs)

    monkeypatch.setattr(nas.train.loop, "proxy_train", counting_train)
    proxy = {"steps": 4, "report_every": 4, "recipe": "tiny", "pruner": "none",
             "overrides": {"batch_size": 8, "val_items": 16, "val_timesteps": 2},
             "zero_cost": {"proxy": "grad_norm", "prune_below_quantile": 0.5, "warmup_trials": 2, "batch_size": 4}}  # fmt: skip
    space = space_file("zc", proxy=proxy)
    s = SearchSettings(
        space=str(space), study="zc", trials=5, cache=str(search_cache), results=str(tmp_path / "r")
    )
    trials = sorted(run_search(s, quiet=True).get_trials(), key=lambda t: t.number)
    assert [t.user_attrs["zero_cost_grad_norm"] for t in trials] == [10.0, 9.0, 8.0, 7.0, 6.0]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 3
    assert [t.user_attrs.get("rejected") for t in trials] == [None, None] + ["zero_cost"] * 3
    # Only the warm-up trials were trained; the pruned ones never reached proxy_train.
    assert trained == [t.user_attrs["arch_name"] for t in trials[:2]]
    assert all("proxy_loss" not in t.user_attrs and "last_step" not in t.user_attrs for t in trials[2:])
