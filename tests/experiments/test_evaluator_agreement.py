"""experiments/studies/evaluator_agreement.py: rank agreement between the two evaluators, and a
checkpoint turned into a run folder that `load_run` reads."""

from __future__ import annotations

import pytest

from experiments.studies.evaluator_agreement import agreement, checkpoint_run


def _point(a: float, ca: float, fd: float, cfd: float) -> dict:
    return {
        "alignment": a,
        "contrastive_alignment": ca,
        "frechet_distance": fd,
        "contrastive_frechet_distance": cfd,
    }


def test_agreement_is_rank_correlation_per_figure():
    points = [_point(0.1, 0.2, 900, 30), _point(0.3, 0.25, 800, 20), _point(0.5, 0.9, 700, 25)]
    got = agreement(points)
    assert got["alignment"]["spearman"] == pytest.approx(1.0) and got["alignment"][
        "kendall"
    ] == pytest.approx(1.0)
    # FD: ranks (3, 2, 1) against (3, 1, 2): rho = 1 - 6 * 2 / (3 * 8) = 0.5, tau = (2 - 1) / 3
    assert got["frechet_distance"]["spearman"] == pytest.approx(0.5)
    assert got["frechet_distance"]["kendall"] == pytest.approx(1 / 3)
    assert got["alignment"]["points"] == 3


def test_checkpoint_becomes_a_run_with_raw_weights(sample_world, tmp_path):
    from nas.sample import load_run

    ckpts = sorted((sample_world.run_stock / "checkpoints").glob("step_*"))
    step = int(ckpts[-1].name.removeprefix("step_"))
    run, weights = checkpoint_run(f"{sample_world.run_stock}@{step}", tmp_path)
    assert weights == "raw" and checkpoint_run(str(sample_world.run_stock), tmp_path) == (
        sample_world.run_stock,
        "ema",
    )
    components = load_run(run, weights=weights)
    assert components.weights == "raw"
    with pytest.raises(SystemExit, match=r"no model\.safetensors"):
        checkpoint_run(f"{sample_world.run_stock}@999999", tmp_path)
