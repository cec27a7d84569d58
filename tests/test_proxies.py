"""Zero-cost proxies: one parametrized table, plus the pre-filter in a search."""

import math

import pytest
from optuna.trial import TrialState

from nas.data.cache import open_cache
from nas.proxies import PROXIES, zero_cost_score
from nas.search.objective import proxy_config
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


def test_zero_cost_prefilter_prunes_low_scores(search_cache, space_file, tmp_path):
    proxy = {"steps": 8, "report_every": 4, "recipe": "tiny",
             "overrides": {"batch_size": 8, "val_items": 16, "val_timesteps": 2},
             "zero_cost": {"proxy": "grad_norm", "prune_below_quantile": 0.5, "warmup_trials": 2, "batch_size": 4}}  # fmt: skip
    space = space_file("zc", proxy=proxy)
    s = SearchSettings(
        space=str(space), study="zc", trials=6, cache=str(search_cache), results=str(tmp_path / "r")
    )
    study = run_search(s, quiet=True)
    trials = study.get_trials()
    assert all("zero_cost_grad_norm" in t.user_attrs for t in trials)
    cut = [t for t in trials if t.user_attrs.get("rejected") == "zero_cost"]
    for t in cut:
        assert t.state == TrialState.PRUNED and "proxy_loss" not in t.user_attrs
