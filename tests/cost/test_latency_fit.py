"""The latency table's correction (block sum -> whole network) on synthetic points whose true model
is known: the ratio and line fits recover it, the ratio ignores one disturbed network, the
leave-one-out error is what a hand computation gives, and tables made before `fit.model` existed
load as the line they hold. No timing."""

import json

import pytest

import nas.cost.table as lt
from nas.core.errors import NasError


def points(pairs):
    return [
        lt.FitPoint(arch=f"n{i}", blocks_ms=x, measured_ms=y, measured_p90_ms=1.1 * y)
        for i, (x, y) in enumerate(pairs)
    ]


BLOCKS = [8.0, 12.0, 20.0, 31.0, 45.0, 60.0]  # ms, the spread of a space's fit networks


def test_ratio_recovers_the_factor_and_ignores_one_disturbed_network():
    exact = points([(x, 1.35 * x) for x in BLOCKS])
    fit = lt.fit_correction(exact, "ratio")
    assert fit.model == "ratio" and (fit.slope, fit.intercept_ms) == pytest.approx((1.35, 0.0))
    assert fit.mean_abs_error_pct == pytest.approx(0.0, abs=1e-9)
    assert fit.loo_abs_error_pct == pytest.approx(0.0, abs=1e-9)
    assert fit.p90_ratio == pytest.approx(1.1)
    # the largest network measured 25% fast (a disturbed measurement): the median ratio stays put,
    # the least-squares line follows it
    disturbed = points([(x, 1.35 * x * (0.75 if x == 60.0 else 1.0)) for x in BLOCKS])
    ratio, line = lt.fit_correction(disturbed, "ratio"), lt.fit_correction(disturbed, "line")
    assert ratio.slope == pytest.approx(1.35)
    assert abs(line.slope - 1.35) > 0.1
    others = [p for p in ratio.points if p.arch != "n5"]
    assert all(p.error_pct == pytest.approx(0.0, abs=1e-9) for p in others)
    assert ratio.loo_abs_error_pct < line.loo_abs_error_pct


def test_line_recovers_slope_and_intercept():
    fit = lt.fit_correction(points([(x, 1.2 * x + 3.0) for x in BLOCKS]), "line")
    assert fit.model == "line" and (fit.slope, fit.intercept_ms) == pytest.approx((1.2, 3.0))
    assert fit.loo_abs_error_pct == pytest.approx(0.0, abs=1e-9)


def test_leave_one_out_by_hand():
    # ratios 1, 2, 4: leaving out 1 -> median(2, 4) = 3 predicts 30 for 10 (200%); leaving out 2 ->
    # median(1, 4) = 2.5 predicts 25 for 20 (25%); leaving out 4 -> 1.5 predicts 15 for 40 (62.5%)
    fit = lt.fit_correction(points([(10.0, 10.0), (10.0, 20.0), (10.0, 40.0)]), "ratio")
    assert fit.slope == pytest.approx(2.0)
    assert fit.loo_abs_error_pct == pytest.approx((200 + 25 + 62.5) / 3)
    assert lt.fit_correction(points([(10.0, 12.0), (20.0, 30.0)]), "ratio").loo_abs_error_pct is None
    assert lt.fit_correction([], "ratio").slope == 1.0  # no networks: the block sum as it is


def test_unknown_correction_is_refused():
    with pytest.raises(NasError, match=r"unknown.*allowed: ratio, line"):
        lt.fit_correction(points([(10.0, 12.0)]), "spline")


def _old_table(tmp_path):
    """A table file as written before `fit.model` existed (a least-squares line)."""
    table = lt.LatencyTable(
        space="tiny",
        settings={"latent_size": 8},
        device=lt.DeviceInfo(device="cpu", name="cpu", threads=1, torch="x"),
        setup=lt.TableSetup(dtype="fp32", batch=1, warmup=0, rounds=1),
        blocks={},
        fit=lt.fit_correction(points([(x, 1.2 * x + 3.0) for x in BLOCKS]), "line"),
    )
    data = table.model_dump(mode="json")
    for key in ("model", "loo_abs_error_pct"):
        del data["fit"][key]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    return path


def test_old_table_loads_as_line_and_refits(tmp_path, monkeypatch):
    table = lt.load_table(_old_table(tmp_path))
    assert table.fit.model == "line" and table.fit.slope == pytest.approx(1.2)
    monkeypatch.setattr(lt, "blocks_ms", lambda table, arch: 10.0)
    assert lt.predict(table, None)["latency_ms_p50"] == pytest.approx(15.0)
    new = lt.refit(table)
    assert new.fit.model == lt.DEFAULT_CORRECTION == "ratio"
    assert [p.arch for p in new.fit.points] == [p.arch for p in table.fit.points]
    ratios = sorted((1.2 * x + 3.0) / x for x in BLOCKS)
    assert new.fit.slope == pytest.approx((ratios[2] + ratios[3]) / 2)
    assert lt.predict(new, None)["latency_ms_p50"] == pytest.approx(10 * new.fit.slope)
    lt.write_table(tmp_path / "new.json", new)
    assert lt.load_table(tmp_path / "new.json") == new
