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


def test_ray_searcher_marks_a_measured_architecture_as_duplicate(space_file, tmp_path):
    """A point the study already measured (here: the same params enqueued twice, as a resumed
    worker replaying its draws would propose) is handed to the trainable marked, recorded pruned
    as `duplicate_of`, and never trained; baselines are always measured."""
    import optuna

    from nas.search.ray_backend import DUPLICATE_OF, DefineByRun, _searcher_class
    from nas.search.storage import SAMPLERS

    space = load_space(space_file("dup"))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'dup.db'}")
    searcher_class = _searcher_class()
    searcher_class.full_steps, searcher_class.space = space.proxy.steps, space
    searcher = searcher_class(
        space=DefineByRun(space),
        metric="proxy_loss",
        mode="min",
        sampler=SAMPLERS["random"](0, False),
        study_name="d",
        storage=storage,
    )
    first = searcher.suggest("a")
    assert isinstance(first, dict) and DUPLICATE_OF not in first
    searcher.on_trial_complete("a", {"proxy_loss": 0.5, "step": space.proxy.steps})
    study = optuna.load_study(study_name="d", storage=storage)
    study.enqueue_trial(study.trials[0].params)
    second = searcher.suggest("b")
    assert second[DUPLICATE_OF] == 0
    searcher.on_trial_complete(
        "b",
        {"proxy_loss": float("nan"), "rejected": "duplicate", "reason": "duplicate of trial 0", "step": 0},
    )
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[1].user_attrs["duplicate_of"] == 0 and trials[1].user_attrs["rejected"] == "duplicate"
    assert trials[1].params == trials[0].params
    study.enqueue_trial(study.trials[0].params, user_attrs={"baseline": "again"})
    third = searcher.suggest("c")
    assert DUPLICATE_OF not in third  # a baseline is measured whatever ran before


def test_a_killed_drivers_running_trial_is_no_measurement(space_file, tmp_path):
    """After a killed driver, its RUNNING trials never finish (failed when the resumed run ends): a
    point equal to one of them is measured, not pruned as its duplicate."""
    import optuna

    from nas.search.ray_backend import DUPLICATE_OF, DefineByRun, _searcher_class
    from nas.search.storage import SAMPLERS

    space = load_space(space_file("orphan"))
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")

    def searcher():
        cls = _searcher_class()
        cls.full_steps, cls.space = space.proxy.steps, space
        return cls(space=DefineByRun(space), metric="proxy_loss", mode="min",
                   sampler=SAMPLERS["random"](0, False), study_name="o", storage=storage)  # fmt: skip

    killed = searcher()
    assert DUPLICATE_OF not in killed.suggest("a")  # RUNNING, and its driver dies here
    study = optuna.load_study(study_name="o", storage=storage)
    study.enqueue_trial(study.trials[0].params)
    resumed = searcher()
    assert DUPLICATE_OF not in resumed.suggest("b")  # trial 0 is an orphan: no measurement
    own = resumed.suggest("c")  # this driver's own running trial does count
    assert own is not None
    study.enqueue_trial(study.trials[1].params)
    assert resumed.suggest("d")[DUPLICATE_OF] == 1
