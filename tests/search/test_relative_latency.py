"""Latency that holds on a shared CPU: `latency.reference: baseline` times every trial beside the
space's first baseline and reports ratio x a fixed reference; trials timed under load are named in
the trial attributes, the card, `nas export`'s output and the summary; importances on few trials
carry a warning. Timing is faked where a figure is asserted (no test depends on the machine's load)."""

import json
import warnings
from pathlib import Path

import optuna
import pytest

import nas.cost.measure as m
import nas.search.objective as objective
from nas.cli import main
from nas.core.errors import NasError
from nas.search.objective import measure_cost, resolve_baselines
from nas.space import load_arch, load_space
from tests.fixtures.space import SPACES, distinct_tiny_archs

BASE_MS, CAND_MS = 10.0, 30.0  # quiet times of the baseline and of any other network (fake clock)


class Load:
    """Stands in for OtherLoad: reports `cores` busy; the fake clock multiplies times by `factor`."""

    cores = 0.0
    factor = 1.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def fake_clock(monkeypatch):
    """Forward.time_ms -> quiet time x Load.factor, no forward run; a fresh per-process reference."""

    def time_ms(self):
        return (BASE_MS if self.arch.name == "tiny_stock" else CAND_MS) * Load.factor

    monkeypatch.setattr(m.Forward, "time_ms", time_ms)
    monkeypatch.setattr(m, "OtherLoad", Load)
    monkeypatch.setattr(Load, "factor", 1.0)
    monkeypatch.setattr(objective, "_REFERENCES", {})
    return Load


def tiny(space_file, **latency):
    """tiny.yaml (baselines as absolute paths) with 5 rounds and no warm-up."""
    return load_space(space_file(latency={"device": "cpu", "batch": 1, "warmup": 0, "iters": 5, **latency}))


def test_same_architecture_same_latency_under_any_load(space_file, fake_clock):
    space = tiny(space_file)
    baseline_arch = load_arch(SPACES / "archs/tiny_stock.yaml")
    cand = distinct_tiny_archs()[0]
    assert cand.name != "tiny_stock"
    first = measure_cost(space, baseline_arch)  # the baseline trial, quiet: fixes the reference
    assert first["latency_reference_ms"] == BASE_MS and first["latency_ratio"] == pytest.approx(1.0)
    reported = []
    for factor in (1.0, 5.0, 40.0, 0.7):  # the machine's load changes between trials
        fake_clock.factor = factor
        a = measure_cost(space, cand)
        reported.append(a["latency_ms_p50"])
        assert a["latency_measured_ms_p50"] == pytest.approx(CAND_MS * factor)  # the raw time moves
        assert a["latency_ratio"] == a["latency_ratio_rounds"] == pytest.approx(CAND_MS / BASE_MS)
        assert a["latency_mode"] == "relative" and a["latency_baseline"] == "tiny_stock"
        assert a["latency_reference_source"] == "measured" and a["latency_reference_ms"] == BASE_MS
    assert reported == pytest.approx([CAND_MS] * 4)

    alone = tiny(space_file, reference="none")  # before: the time of the moment
    fake_clock.factor = 40.0
    a = measure_cost(alone, cand)
    assert a["latency_ms_p50"] == pytest.approx(CAND_MS * 40) and a["latency_mode"] == "alone"


def test_reference_ms_fixes_the_scale_across_studies(space_file, fake_clock, monkeypatch):
    """With latency.reference_ms, studies that start under different loads agree (each study is a
    fresh process: the per-process reference is dropped between them)."""
    space = tiny(space_file, reference_ms=12.0)
    cand = distinct_tiny_archs()[1]
    reported = []
    for factor in (1.0, 7.0, 40.0, 0.5):
        monkeypatch.setattr(objective, "_REFERENCES", {})
        fake_clock.factor = factor
        a = measure_cost(space, cand)
        reported.append(a["latency_ms_p50"])
        assert a["latency_reference_source"] == "space" and a["latency_reference_cores_busy"] is None
    assert reported == pytest.approx([12.0 * CAND_MS / BASE_MS] * 4)


def test_bad_reference_settings(space_file, write_yaml, fake_clock):
    text = (SPACES / "tiny.yaml").read_text()
    for latency, message in (
        ("{source: table, table: t.json, reference_ms: 5}", "reference_ms applies only to source: measure"),
        ("{reference: none, reference_ms: 5}", "needs reference: baseline"),
        ("{reference: fastest}", "reference"),
    ):
        path = write_yaml(
            text.replace("latency: {device: cpu, batch: 1, warmup: 1, iters: 3}", f"latency: {latency}")
        )
        with pytest.raises(NasError, match=message):
            load_space(path)
    space = load_space(space_file(baselines=["/nonexistent/base.yaml"]))
    with pytest.raises(NasError, match=r"baselines\[0\] /nonexistent/base\.yaml not found"):
        measure_cost(space, distinct_tiny_archs()[0])
    resolved = resolve_baselines(load_space(SPACES / "tiny.yaml"), SPACES / "tiny.yaml")
    assert resolved.baselines == [str((SPACES / "archs/tiny_stock.yaml").resolve())]


class EveryOtherBusy:
    """OtherLoad that reports 1.5 busy cores on every second measurement (real timing)."""

    count = 0

    def __enter__(self):
        type(self).count += 1
        self.cores = 1.5 if type(self).count % 2 == 0 else 0.0
        return self

    def __exit__(self, *exc):
        pass


def test_loaded_trials_named_in_attributes_card_pick_and_summary(
    search_cache, space_file, memory_tmp, monkeypatch, capsys
):
    from nas.search.report import write_report
    from nas.search.study import SearchSettings, run_search

    monkeypatch.setattr(m, "OtherLoad", EveryOtherBusy)
    # count 1 already: the shared reference's timing is the 2nd measurement (busy), then trials 0, 1, 2
    monkeypatch.setattr(EveryOtherBusy, "count", 1)
    monkeypatch.setattr(objective, "_REFERENCES", {})
    proxy = {"steps": 2, "report_every": 2, "recipe": "tiny",
             "overrides": {"batch_size": 4, "val_items": 8, "val_timesteps": 1, "warmup_steps": 1}}  # fmt: skip
    path = space_file("busy", proxy=proxy, latency={"device": "cpu", "batch": 1, "warmup": 0, "iters": 3})
    results = memory_tmp / "results"
    settings = SearchSettings(
        space=str(path), study="busy", trials=3, cache=str(search_cache), results=str(results)
    )
    study = run_search(settings, quiet=True)
    trials = study.get_trials()
    for t in trials:  # the ratio attributes, and latency = per-round ratio x the study's reference
        a = t.user_attrs
        assert a["latency_mode"] == "relative" and a["latency_ratio"] > 0
        assert a["latency_ms_p50"] == pytest.approx(a["latency_ratio_rounds"] * a["latency_reference_ms"])
        # the reference: the baseline timed alone before the first trial, in the file every study
        # under this --results folder reads
        assert a["latency_reference_source"] == "shared" and a["latency_reference_cores_busy"] == 1.5
        shared = json.loads(Path(a["latency_reference_from"]).read_text())
        assert a["latency_reference_ms"] == shared["reference_ms"] and shared["rounds"] == 3
    (reference_file,) = (results / objective.SHARED_REFERENCES).iterdir()
    loaded = [t.number for t in trials if t.user_attrs["latency_loaded"]]
    assert loaded == [1]  # the fourth measurement of the process

    out = memory_tmp / "export"
    assert (
        main(["export", "--study", "busy", "--results", str(results), "--pick", "best", "--out", str(out)])
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: study busy: trials 1 (1 of 3 completed) were timed while other processes" in err
    assert len([line for line in err.splitlines() if "warning" in line]) == 1
    card = json.loads((out / "card.json").read_text())
    assert card["loaded_trials"] == [1] and card["latency_loaded"] == (card["trial"] == 1)
    assert card["latency_mode"] == "relative" and card["latency_reference_ms"] > 0
    text = (out / "card.md").read_text()
    assert "Warning: study busy: trials 1" in text and "in alternation with baseline `tiny_stock`" in text
    assert f"delete {reference_file} to time it again" in text  # the reference was timed under load

    written = write_report(study, memory_tmp / "report")
    assert written["load"].startswith("warning: study busy: trials 1 ")
    summary = (memory_tmp / "report" / "summary.md").read_text()
    assert "trials 1 (1 of 3 completed)" in summary and "| 1.5 cores |" in summary


def synthetic_study(n: int) -> optuna.Study:
    """An in-memory two-objective study of `n` completed trials over two parameters."""
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(directions=["minimize", "minimize"], study_name=f"s{n}")
    study.set_user_attr("objectives", ["proxy_loss", "latency_ms"])
    dists = {"depth": IntDistribution(1, 3), "channels": CategoricalDistribution([16, 32])}
    for i in range(n):
        params = {"depth": 1 + i % 3, "channels": [16, 32][i % 2]}
        loss, ms = 1.0 / (1 + params["depth"]) + 0.01 * (i % 5), 2.0 * params["depth"] + i % 4
        attrs = {"proxy_loss": loss, "latency_ms_p50": ms, "params": 1000 * (i + 1), "macs": 1e6 * (i + 1)}
        study.add_trial(create_trial(params=params, distributions=dists, values=[loss, ms], user_attrs=attrs))
    return study


@pytest.mark.parametrize("n", [8, 20])
def test_importances_say_how_many_trials_they_rest_on(n, tmp_path, monkeypatch):
    import nas.search.report as report

    titles = []
    real_save = report._save

    def spy(ax, path):
        titles.append(ax.get_title())
        real_save(ax, path)

    monkeypatch.setattr(report, "_save", spy)
    study = synthetic_study(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Optuna's per-parameter notes: one line of ours instead
        written = report.write_report(study, tmp_path)
    assert f"from {n} completed trials" in titles[-1]
    summary = (tmp_path / "summary.md").read_text()
    if n < report.MIN_IMPORTANCE_TRIALS:
        assert written["warning"].startswith(f"parameter importances rest on {n} completed trials (< 20)")
        assert "under 20: noise" in titles[-1] and f"rest on {n} completed trials" in summary
    else:
        assert "warning" not in written and "noise" not in titles[-1] and "importances rest" not in summary
    assert "load" not in written  # no latency attributes at all: nothing timed under load


def test_card_says_when_the_study_reference_was_timed_under_load():
    from nas.search.export import _latency_source

    card = {"latency_device": "cpu X", "latency_source": "measure", "latency_mode": "relative",
            "latency_baseline": "b", "latency_ratio_rounds": 0.5, "latency_reference_ms": 40.0,
            "latency_reference_source": "measured", "latency_reference_cores_busy": 1.2}  # fmt: skip
    text = _latency_source(card)
    assert "0.500 x its reference 40.00 ms" in text and "kept 1.2 CPU cores busy" in text
    assert "set latency.reference_ms to compare studies" in text
    quiet = _latency_source({**card, "latency_reference_cores_busy": 0.1})
    assert "busy" not in quiet and quiet.endswith(
        "(the baseline's first time measured in the search process)"
    )
    given = _latency_source(
        {**card, "latency_reference_source": "space", "latency_reference_cores_busy": None}
    )
    assert given.endswith("(latency.reference_ms of the space)")
    shared = _latency_source({**card, "latency_reference_source": "shared", "latency_reference_cores_busy": 0.0,
                              "latency_reference_from": "results/.latency_reference/b-0123.json"})  # fmt: skip
    assert shared.endswith("under this results folder: b-0123.json, shared by every study there)")


def test_studies_under_one_results_folder_share_the_reference(space_file, search_cache, fake_clock, tmp_path):
    """The first study under a --results folder times the baseline alone and writes the reference
    file; a later study there, started under 40x the load, reads it, so the same architecture gets
    the same latency in both. Another --results folder, or latency.reference_ms, is independent."""
    from nas.search.objective import prepare_search

    path = space_file("shared", latency={"device": "cpu", "batch": 1, "warmup": 0, "iters": 5})
    cand = distinct_tiny_archs()[2]
    reported = []
    for factor in (1.0, 40.0):  # two studies (processes: the per-process reference dropped)
        objective._REFERENCES.clear()
        fake_clock.factor = factor
        space = prepare_search(path, str(search_cache), None, tmp_path / "results").space
        assert space.latency.reference_ms == BASE_MS  # timed in the first study, quiet
        a = measure_cost(space, cand)
        assert a["latency_reference_source"] == "shared"
        reported.append(a["latency_ms_p50"])
    assert reported == pytest.approx([CAND_MS] * 2)
    assert len(list((tmp_path / "results" / objective.SHARED_REFERENCES).iterdir())) == 1
    objective._REFERENCES.clear()
    other = prepare_search(path, str(search_cache), None, tmp_path / "other").space
    assert other.latency.reference_ms == BASE_MS * 40.0  # its own first study timed it under load
    fixed = space_file(
        "fixed", latency={"device": "cpu", "batch": 1, "warmup": 0, "iters": 5, "reference_ms": 7.0}
    )
    assert (
        prepare_search(fixed, str(search_cache), None, tmp_path / "results").space.latency.reference_ms == 7.0
    )
