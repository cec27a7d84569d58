"""A proxy config with `report_to: tensorboard` (the space's proxy overrides) logs one TensorBoard run
per trial under results/<study>/tracking/, named by the trial's architecture."""

from nas.search.study import SearchSettings, run_search


def test_each_trial_is_one_tensorboard_run(search_cache, space_file, memory_tmp):
    proxy = {"steps": 2, "report_every": 2, "recipe": "tiny",
             "overrides": {"batch_size": 4, "val_items": 8, "val_timesteps": 1, "warmup_steps": 1,
                           "report_to": "tensorboard"}}  # fmt: skip
    path = space_file("tb", proxy=proxy, latency={"device": "cpu", "batch": 1, "warmup": 0, "iters": 1})
    results = memory_tmp / "results"
    settings = SearchSettings(
        space=str(path), study="tb", trials=3, cache=str(search_cache), results=str(results)
    )
    study = run_search(settings, quiet=True)
    trained = {f"tb-t{t.number}" for t in study.get_trials() if "proxy_loss" in t.user_attrs}
    assert trained and {p.name for p in (results / "tb" / "tracking").iterdir()} == trained
    for name in trained:
        assert list((results / "tb" / "tracking" / name).glob("events.out.tfevents.*"))
