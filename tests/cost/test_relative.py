"""Latency relative to a reference network timed in alternation (nas/cost/relative.py), under a fake
clock: a load that slows both networks alike leaves the ratio where it was."""

import pytest

import nas.cost.measure as m
from nas.cost.relative import measure_pair
from nas.space import build_unet, load_arch
from tests.fixtures.space import ARCHS, distinct_tiny_archs


class FakeLoad:
    cores = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def fake_clock(monkeypatch, base_ms: dict[str, float], loads: list[float]) -> list[str]:
    """Forward.time_ms -> base_ms[arch] x the load of the moment (loads[i // 2] for the i-th timed
    call: a load that changes between rounds); returns the names in the order they were timed."""
    order: list[str] = []

    def time_ms(self):
        order.append(self.arch.name)
        return base_ms[self.arch.name] * loads[(len(order) - 1) // 2]

    monkeypatch.setattr(m.Forward, "time_ms", time_ms)
    monkeypatch.setattr(m, "OtherLoad", FakeLoad)
    return order


@pytest.fixture(scope="module")
def forwards():
    base = load_arch(ARCHS / "tiny_stock.yaml")
    cand = distinct_tiny_archs()[0]
    return m.Forward(build_unet(cand), cand), m.Forward(build_unet(base), base)


def test_ratio_holds_when_a_load_slows_both(monkeypatch, forwards):
    cand, base = forwards
    loads = [1.0, 3.0, 1.5, 40.0, 2.0]  # the load of each round, as on a shared CPU
    order = fake_clock(monkeypatch, {cand.arch.name: 25.0, base.arch.name: 10.0}, loads)
    pair = measure_pair(cand, base, warmup=0, rounds=5)
    assert pair.ratio_rounds == pytest.approx(2.5) and pair.ratio_rounds_p90 == pytest.approx(2.5)
    assert pair.ratio == pytest.approx(2.5)  # medians of the same rounds
    assert pair.candidate.latency_ms_p50 == pytest.approx(25.0 * 2.0)  # the raw time follows the load
    # ABBA: the candidate first in even rounds, the baseline first in odd ones
    c, b = cand.arch.name, base.arch.name
    assert order == [c, b, b, c, c, b, b, c, c, b]


def test_ratio_of_medians_and_median_of_ratios_differ_under_uneven_load(monkeypatch, forwards):
    cand, base = forwards
    # the load changes within the rounds: each call sees its own factor
    factors = iter([1.0, 1.0, 1.0, 1.0, 9.0, 1.0])
    monkeypatch.setattr(m.Forward, "time_ms", lambda self: (20.0 if self is cand else 10.0) * next(factors))
    monkeypatch.setattr(m, "OtherLoad", FakeLoad)
    pair = measure_pair(cand, base, warmup=0, rounds=3)
    # rounds (candidate, baseline): (20, 10), (20, 10) timed baseline first, (180, 10)
    assert pair.ratio_rounds == pytest.approx(2.0)  # one round of 18x is outvoted
    assert pair.ratio_rounds_p90 == pytest.approx(18.0)
    assert pair.ratio == pytest.approx(2.0)


def test_pair_needs_rounds_and_one_device(forwards):
    cand, base = forwards
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        measure_pair(cand, base, warmup=0, rounds=0)
    meta = m.Forward.__new__(m.Forward)
    meta.device = m.torch.device("meta")
    with pytest.raises(ValueError, match="time both on one"):
        measure_pair(cand, meta, warmup=0, rounds=1)
