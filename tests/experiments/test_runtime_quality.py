"""experiments/benchmarks/runtime_quality.py: the logic behind its figures (flag, best runtime, steps to match
and the combined images/s ratio), on made-up numbers; no model is loaded."""

from __future__ import annotations

import pytest

from experiments.benchmarks.runtime_quality import best_arm, combined, flag


def q(alignment: float, fd: float) -> dict:
    return {"alignment": alignment, "frechet_distance": fd}


def test_flag_only_beyond_the_seed_noise():
    eager, noise = q(0.50, 2000), {"alignment": 0.02, "frechet_distance": 50}
    assert flag(q(0.51, 2040), eager, noise) == []
    assert flag(q(0.47, 2040), eager, noise) == ["alignment"]
    assert flag(q(0.50, 1940), eager, noise) == ["frechet_distance"]  # better counts too: it moved


def test_best_arm_skips_flagged_runtimes():
    ips = {"eager fp32": {30: 1.0}, "onnxruntime int8": {30: 3.0}, "openvino fp32": {30: 2.0}}
    assert best_arm(ips, 30, {}) == "onnxruntime int8"
    assert best_arm(ips, 30, {"onnxruntime int8": ["alignment"], "openvino fp32": []}) == "openvino fp32"


def test_combined_uses_the_fewest_matching_steps_and_their_images_per_s():
    cand = {5: q(0.40, 2300), 10: q(0.52, 2100), 20: q(0.55, 1900), 30: q(0.56, 1850)}
    base = {30: q(0.50, 2000), 50: q(0.51, 1950)}
    c = combined(cand, base, 50, {5: 12.0, 10: 8.0, 20: 5.0, 30: 4.0}, base_ips=1.0)
    assert c["steps_to_match_baseline_50"] == 10 and c["combined_speedup"] == 8.0
    assert c["steps_to_match_baseline_50_fd"] == 20 and c["combined_speedup_fd"] == 5.0
    assert c["baseline_alignment_gain"] == pytest.approx(0.01)
    assert c["baseline_fd_gain"] == pytest.approx(50)
    never = combined({5: q(0.10, 9000)}, base, 50, {5: 12.0}, base_ips=1.0)
    assert never["steps_to_match_baseline_50"] is None and never["combined_speedup"] is None
