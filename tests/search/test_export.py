"""`nas export` and `nas report` on a real finished study."""

import json

import pytest
from diffusers import UNet2DConditionModel

from nas.cli import main
from nas.core.errors import NasError
from nas.models import FlexUNet2DConditionModel
from nas.search.export import _knee, parse_conditions, pick_trial
from nas.search.study import SearchSettings, load_study, run_search
from nas.space import load_arch

CLASSES = {"UNet2DConditionModel": UNet2DConditionModel, "FlexUNet2DConditionModel": FlexUNet2DConditionModel}


@pytest.fixture(scope="module")
def finished_study(search_cache, tmp_path_factory):
    import yaml

    from tests.fixtures.space import SPACES

    root = tmp_path_factory.mktemp("export")
    data = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    data["baselines"] = [str(SPACES / rel) for rel in data["baselines"]]
    data["proxy"].update(steps=8, report_every=4)
    data["latency"] = {"device": "cpu", "batch": 1, "warmup": 0, "iters": 1}
    space = root / "tiny.yaml"
    space.write_text(yaml.safe_dump(data))
    s = SearchSettings(
        space=str(space), study="e", trials=5, cache=str(search_cache), results=str(root / "results")
    )
    run_search(s, quiet=True)
    return root / "results"


@pytest.mark.parametrize("pick", ["best", "knee", "latency_ms<=1000, params<1e9"])
def test_export_writes_loadable_config(capsys, finished_study, tmp_path, pick):
    out = tmp_path / "export"
    assert (
        main(["export", "--study", "e", "--results", str(finished_study), "--pick", pick, "--out", str(out)])
        == 0
    )
    card = json.loads((out / "card.json").read_text())
    assert {"params", "macs", "latency_ms_p50", "proxy_loss", "trial", "study", "space", "date"} <= set(card)
    config = json.loads((out / "config.json").read_text())
    cls = CLASSES[config["_class_name"]]
    model = cls.from_config(cls.load_config(out))
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    assert load_arch(out / "arch.yaml").name.startswith("e-t")
    if cls is FlexUNet2DConditionModel:  # its code ships, for AutoModel without nas
        assert config["auto_map"] == {"AutoModel": "flex_unet.FlexUNet2DConditionModel"}
        assert (out / "flex_unet.py").is_file() and "trust_remote_code=True" in (out / "card.md").read_text()
    else:
        assert not list(out.glob("*.py")) and "auto_map" not in config
    assert (out / "card.md").read_text().startswith("# ")


def test_best_is_lowest_proxy_loss_and_constraints_hold(finished_study):
    study = load_study("e", results=str(finished_study))
    complete = [t for t in study.get_trials() if "proxy_loss" in t.user_attrs and t.state.name == "COMPLETE"]
    best = pick_trial(study, "best")
    assert best.user_attrs["proxy_loss"] == min(t.user_attrs["proxy_loss"] for t in complete)
    cut = sorted(t.user_attrs["params"] for t in complete)[1]
    constrained = pick_trial(study, f"params<={cut}")
    assert constrained.user_attrs["params"] <= cut


def test_pick_relative_to_the_baseline(finished_study):
    study = load_study("e", results=str(finished_study))
    complete = [t for t in study.get_trials() if "proxy_loss" in t.user_attrs and t.state.name == "COMPLETE"]
    base = next(t for t in complete if "baseline" in t.user_attrs)
    smaller = [t for t in complete if t.user_attrs["params"] <= base.user_attrs["params"]]
    picked = pick_trial(study, "params<=1*baseline")
    assert picked.user_attrs["params"] <= base.user_attrs["params"]
    assert picked.user_attrs["proxy_loss"] == min(t.user_attrs["proxy_loss"] for t in smaller)


@pytest.mark.parametrize("expr", ["latency_ms=<3", "speed<=3", "latency_ms<=fast", "params<=2*baselines"])
def test_bad_pick_expression(expr):
    with pytest.raises(NasError, match="cannot read"):
        parse_conditions(expr)


def test_unsatisfiable_pick_says_what_exists(finished_study):
    with pytest.raises(NasError, match="no completed trial satisfies"):
        pick_trial(load_study("e", results=str(finished_study)), "params<=10")


def test_missing_study(capsys, finished_study):
    assert main(["export", "--study", "nope", "--results", str(finished_study), "--out", "x"]) == 2
    assert "nope" in capsys.readouterr().err


def test_report_writes_plots_and_summary(capsys, finished_study):
    assert main(["report", "--study", "e", "--results", str(finished_study)]) == 0
    folder = finished_study / "e"
    for name in ("pareto.png", "history.png", "summary.md"):
        assert (folder / name).stat().st_size > 1000 or name == "summary.md"
    summary = (folder / "summary.md").read_text()
    assert "tiny_stock" in summary and "| yes |" in summary
    assert "optuna-dashboard sqlite:///" in capsys.readouterr().out


@pytest.mark.parametrize(
    "front, expected",
    [
        ([(0.10, 20.0), (0.11, 10.0)], 1),  # +10% loss for half the latency: the faster one
        ([(0.11, 10.0), (0.10, 20.0)], 0),  # same, other order: not merely the first
        ([(0.10, 11.0), (0.20, 10.0)], 0),  # double the loss for 9% less latency: the accurate one
        ([(0.10, 30.0), (0.12, 12.0), (0.30, 10.0)], 1),  # a real knee: the middle point
    ],
)
def test_knee_breaks_two_point_ties_by_relative_cost(front, expected):
    import optuna

    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in front:
        study.add_trial(optuna.trial.create_trial(values=list(values)))
    assert _knee(study, study.get_trials()).number == expected
