"""experiments/studies/inherit_distill.py's quality report: means over training seeds, compute with the
teacher's forward counted, and the fewest distilled steps that reach the longest scratch run."""

from __future__ import annotations

import pytest

from experiments.studies.inherit_distill import quality_report


def _row(method: str, steps: int, seed: int, alignment: float, fd: float, **times) -> dict:
    return {"method": method, "steps": steps, "seed": seed, "alignment": alignment, "fd": fd, **times}


def test_quality_report_means_seeds_and_finds_steps_to_match(tmp_path):
    # a distilled step: 0.3 s of which the teacher 0.1 s -> 1.5 student-step equivalents
    t = {"step_s": 0.3, "teacher_s": 0.1}
    rows = [
        _row("scratch", 1000, 0, 0.40, 2000.0),
        _row("scratch", 2000, 0, 0.54, 1860.0),
        _row("scratch", 2000, 1, 0.56, 1840.0),  # scratch final: alignment 0.55, FD 1850
        _row("distill", 100, 0, 0.50, 1800.0, **t),
        _row("distill", 100, 1, 0.52, 1820.0, **t),  # FD 1810 beats 1850; alignment 0.51 does not
        _row("distill", 400, 0, 0.54, 1790.0, **t),
        _row("distill", 400, 1, 0.60, 1800.0, **t),  # alignment 0.57 >= 0.55
    ]
    q = {f"{r['method']}-{r['steps']}-s{r['seed']}": r for r in rows}
    lines = quality_report(q, tmp_path)
    text = "\n".join(lines)
    assert "| distill | 400 | 2 | 0.570 [0.540-0.600] | 1795 [1790-1800] |" in text
    assert "| scratch | 2000 | 2 | 0.550 [0.540-0.560] |" in text
    # alignment: 2000 / 400 = 5x fewer steps; compute 2000 / (400 * 1.5) = 3.3x
    assert (
        "alignment: scratch 2000 steps 0.550 reached by distill 400 steps (0.570): 5.0x fewer steps, 3.3x"
        in text
    )
    # Frechet distance (lower is better): reached at 100 steps: 20x fewer, 2000 / 150 = 13.3x compute
    assert (
        "Frechet distance: scratch 2000 steps 1850 reached by distill 100 steps (1810): 20.0x fewer steps, 13.3x"
        in text
    )
    # against the best scratch seed (0.56 / 1840): alignment at 400 steps, FD still at 100 (1810)
    assert "alignment: scratch 2000 steps (best seed) 0.560 reached by distill 400 steps" in text
    assert "Frechet distance: scratch 2000 steps (best seed) 1840 reached by distill 100 steps (1810)" in text
    assert "| scratch | 1000 | 1 | 0.400 [0.400-0.400] | 2000 [2000-2000] | - | 0.000 | 1000 |" in text
    assert q["distill-100-s0"]["student_step_equivalents"] == pytest.approx(150.0)
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_report_says_when_no_distilled_run_reaches_scratch(tmp_path):
    q = {
        "scratch-2000": _row("scratch", 2000, 0, 0.60, 1800.0),
        "distill-100": _row("distill", 100, 0, 0.50, 1900.0, step_s=0.3, teacher_s=0.1),
    }
    text = "\n".join(quality_report(q, tmp_path))
    assert "alignment: no distilled run reaches scratch 2000 steps (0.600)" in text
    assert "Frechet distance: no distilled run reaches scratch 2000 steps (1800)" in text
