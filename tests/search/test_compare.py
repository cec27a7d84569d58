"""Comparing studies: exact 2-D hypervolume, the figures per study, `nas report` over several
studies, and experiments/studies/search_validity.py (both modes, resumable) on the tiny space with the
`synthetic` point (tests/fixtures/search.py)."""

import json
import random

import pytest
from optuna.trial import TrialState

from nas.cli import main
from nas.search import compare as cmp
from nas.search.study import SearchSettings, run_search


def test_hypervolume_2d_is_the_dominated_area():
    # a staircase: 3 + 2 + 1 unit boxes; a point beyond the reference adds nothing
    assert cmp.hypervolume_2d([(1, 3), (2, 2), (3, 1), (5, 0.5)], (4, 4)) == pytest.approx(6)
    assert cmp.hypervolume_2d([(2, 2), (3, 3)], (4, 4)) == pytest.approx(4)  # a dominated point adds nothing
    assert cmp.hypervolume_2d([], (4, 4)) == 0


def test_hypervolume_2d_matches_optuna():
    import numpy as np
    from optuna._hypervolume import compute_hypervolume  # private: a cross-check only

    rng = random.Random(0)
    for _ in range(20):
        points = [(rng.uniform(0, 1), rng.uniform(0, 1)) for _ in range(rng.randint(1, 15))]
        expected = compute_hypervolume(np.array(points), np.array([1.1, 1.1]))
        assert cmp.hypervolume_2d(points, (1.1, 1.1)) == pytest.approx(expected)


def _studies(table_space, search_cache, results, samplers=("tpe", "random"), trials=6):
    space = table_space("cmp", steps=4)
    for sampler in samplers:
        run_search(SearchSettings(space=str(space), study=sampler, trials=trials, cache=str(search_cache),
                                  sampler=sampler, results=str(results)), quiet=True)  # fmt: skip


def test_report_overlays_several_studies(synthetic, table_space, search_cache, memory_tmp, capsys):
    results = memory_tmp / "results"
    _studies(table_space, search_cache, results)
    out = memory_tmp / "overlay"
    assert (
        main(["report", "--study", "tpe", "--study", "random", "--results", str(results), "--out", str(out)])
        == 0
    )
    assert {"hypervolume.png", "fronts.png", "compare.md", "compare.json"} <= {p.name for p in out.iterdir()}
    result = json.loads((out / "compare.json").read_text())
    ref = result["reference"]["point"]
    from nas.search.study import load_study

    for name in ("tpe", "random"):
        row = result["groups"][name]["studies"][0]
        study = load_study(name, None, str(results))
        trials = study.get_trials()
        points = [(t.user_attrs["proxy_loss"], t.user_attrs["latency_ms_p50"]) for t in trials]
        base = points[0]  # the baseline, enqueued first
        assert ref == pytest.approx([base[0] * 1.1, base[1] * 1.1])
        curve = row["hypervolume"]
        assert len(curve) == 6 and curve == sorted(curve)  # a front only grows
        assert curve[0] == pytest.approx(0.1 * 0.1 / 1.1 / 1.1)  # the baseline's own box
        assert curve[-1] == pytest.approx(cmp.hypervolume_2d(points, tuple(ref)) / (ref[0] * ref[1]))
        first = next((i for i, p in enumerate(points) if i and cmp.dominates(p, base)), None)
        assert row["first_dominating_trial"] == (None if first is None else first + 1)
        under = [p[0] for p in points if p[1] <= 0.8 * base[1]]
        assert row["best_loss_under_budget"] == (min(under) if under else None)
        assert row["states"]["COMPLETE"] == 6 and row["proxy_steps"] == 6 * 4
    assert "| tpe |" in (out / "compare.md").read_text() and result["reference"]["how"] == "baseline"
    # one storage per study must match the study count
    code = main(["report", "--study", "tpe", "--study", "random", "--storage", "sqlite:///a.db",
                 "sqlite:///b.db", "sqlite:///c.db"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "3 URLs for 2 studies" in err and err.count("\n") == 1


def test_report_settings_accept_one_name():
    """`nas run` builds the report settings with one study name (nas/pipeline/plan.py)."""
    from nas.commands.report import Settings

    s = Settings.model_validate({"study": "x", "storage": "sqlite:///s.db"})
    assert s.study == ["x"] and s.storage == ["sqlite:///s.db"]


def _script(argv):
    from experiments.studies.search_validity import main as script

    return script(argv)


def test_search_validity_script_both_modes_resume(
    synthetic, search_cache, search_latency_table, memory_tmp, repo_root, capsys
):
    out = memory_tmp / "sv"
    common = [str(repo_root / "search_spaces" / "tiny.yaml"), "--cache", str(search_cache), "--out", str(out),
              "--latency-table", str(search_latency_table), "--seeds", "0", "1", "--trials", "3", "--quiet"]  # fmt: skip
    assert _script([*common, "--samplers", "tpe", "random"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result["groups"]) == {"tpe", "random"}
    for group in result["groups"].values():
        assert [len(s["hypervolume"]) for s in group["studies"]] == [3, 3]
        assert group["summary"]["final_hypervolume"]["n"] == 2
    assert (out / "hypervolume.png").is_file() and (out / "fronts.png").is_file()
    assert _script([*common, "--samplers", "tpe", "random"]) == 0  # rerun: nothing left to run
    assert "4 of 4 studies finished; running 0" in capsys.readouterr().out

    assert _script([*common, "--pruning", "--pruners", "none", "successive_halving", "--seeds", "0"]) == 0
    pruning = (out / "pruning" / "pruning.md").read_text()
    assert "| none |" in pruning and "| successive_halving |" in pruning
    # the budget rejects the baseline, so the hypervolume reference falls back to the worst observed
    assert json.loads((out / "pruning" / "compare.json").read_text())["reference"]["how"] == "worst"
    from nas.search.study import load_study

    study = load_study("prune-none-s0", None, str(out / "studies"))
    assert len(study.directions) == 1
    budget = study.user_attrs["space"]["budgets"]["latency_ms"]
    base = study.get_trials()[0]
    assert base.user_attrs["baseline"] and base.state == TrialState.PRUNED  # over the budget
    assert budget == pytest.approx(0.8 * base.user_attrs["latency_ms_p50"], rel=1e-3)


def test_search_validity_needs_a_table(search_cache, memory_tmp, repo_root, capsys):
    code = _script([str(repo_root / "search_spaces" / "tiny.yaml"), "--cache", str(search_cache),
                    "--out", str(memory_tmp), "--latency-table", str(memory_tmp / "none.json")])  # fmt: skip
    assert code == 2 and "pass --latency-table" in capsys.readouterr().err
