"""The Ray Tune engine: resource checks, and the same study run on a local Ray."""

import pytest
from optuna.trial import TrialState

from nas.core.errors import NasError
from nas.search.ray_backend import RaySettings, check_resources, run_ray_search
from nas.search.study import SearchSettings, load_study
from nas.space import load_space

CLUSTER = {"CPU": 2.0, "memory": 1e10, "node:127.0.0.1": 1.0}


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        ({"GPU": 1.0}, "GPU=1"),
        ({"CPU": 4.0}, "CPU=4"),
        ({"accelerator_type:A10G": 0.001}, "accelerator_type:A10G"),
    ],
)
def test_unsatisfiable_requests_are_refused(request_, needle):
    with pytest.raises(NasError, match=needle):
        check_resources(request_, CLUSTER)


def test_satisfiable_request_passes():
    check_resources({"CPU": 1.0, "GPU": 0.0}, CLUSTER)


def test_ray_backend_runs_the_study_locally(search_cache, space_file, tmp_path):
    space = space_file("ray")
    results = tmp_path / "results"
    settings = SearchSettings(
        space=str(space), study="r", trials=3, cache=str(search_cache), results=str(results)
    )
    try:
        run_ray_search(settings, RaySettings(cpus_per_trial=1), quiet=True)
    finally:
        import ray

        ray.shutdown()
    study = load_study("r", results=str(results))
    trials = study.get_trials()
    assert len(trials) == 3
    assert trials[0].user_attrs.get("baseline") == "tiny_stock"
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert (
                t.user_attrs["params"] > 0
                and "arch" in t.user_attrs
                and t.values[0] == t.user_attrs["proxy_loss"]
            )
        if "proxy_loss" in t.user_attrs:  # trained: its proxy steps are counted, as the Optuna engine does
            assert 0 < t.user_attrs["last_step"] <= load_space(space).proxy.steps
    assert (results / "r" / "ray" / "r").is_dir()  # Tuner experiment folder, restorable
