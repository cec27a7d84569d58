"""experiments/studies/few_step.py's report: means over training seeds per row and step count, U-Net
evaluations and MACs per image (2 per CFG step, 1 per guidance-embedded step), rows at another
guidance kept apart, the goal check against the baseline at 50 steps, and the factors."""

from __future__ import annotations

import json
import shutil

from experiments.studies.few_step import report, row_runs
from nas.cost.measure import arch_cost
from nas.space import load_arch
from tests.fixtures.space import ARCHS


def _run(out, name, arch="tiny_stock.yaml"):
    run = out / "runs" / name
    (run / "final").mkdir(parents=True)
    shutil.copy(ARCHS / arch, run / "arch.yaml")
    return run


def _speed(images_per_s, unet_ms, unet_s, te_share, vae_share):
    return {"images": 8, "images_per_s": images_per_s, "unet_ms_per_forward": unet_ms, "unet_s": unet_s,
            "text_encoder_share": te_share, "unet_share": 0.9 - te_share - vae_share,
            "vae_decode_share": vae_share, "other_share": 0.1}  # fmt: skip


def test_report_means_seeds_counts_evaluations_and_checks_the_goal(tmp_path, capsys):
    out = tmp_path
    _run(out, "teacher")
    for seed in (0, 1):
        _run(out, f"searched-s{seed}", "tiny_flex.yaml")
        _run(out, f"searched_lcm-s{seed}", "tiny_flex.yaml")
    _run(out, "searched_lcm-s9", "tiny_flex.yaml").joinpath("final").rmdir()  # unfinished: not a row
    assert [len(v) for v in row_runs(out).values()] == [1, 2, 2]

    def q(row, run, guidance, results):
        return {"row": row, "run": run, "guidance": guidance, "results": results}

    quality = {
        "baseline/teacher": q("baseline", "teacher", 7.5, {"50": {"alignment": 0.60, "fd": 1000.0}}),
        "searched/searched-s0": q("searched", "s0", 7.5, {"30": {"alignment": 0.57, "fd": 1100.0}}),
        "searched_lcm/searched_lcm-s0": q("searched_lcm", "l0", 7.5, {"4": {"alignment": 0.59, "fd": 1050.0}}),
        "searched_lcm/searched_lcm-s1": q("searched_lcm", "l1", 7.5, {"4": {"alignment": 0.57, "fd": 1150.0}}),
        "searched_lcm/searched_lcm-s0@g4": q("searched_lcm", "l0", 4.0, {"4": {"alignment": 0.50, "fd": 900.0}}),
    }  # fmt: skip
    speed = {"baseline@50": _speed(1.0, 20.0, 16.0, 0.02, 0.01), "searched@30": _speed(3.0, 10.0, 4.8, 0.05, 0.02),
             "searched@4": _speed(15.0, 10.0, 0.64, 0.25, 0.05), "searched_lcm@4": _speed(20.0, 5.0, 0.16, 0.3, 0.1)}  # fmt: skip
    (out / "rows.json").write_text(json.dumps({"quality": quality, "speed": {"rows": speed}}))

    class Args:
        pass

    args = Args()
    args.out = str(out)
    report(args)
    text = (out / "table.md").read_text()
    lines = {
        line.split(" | ")[0] + " | " + line.split(" | ")[1]: line
        for line in text.splitlines()
        if line.startswith("| ")
    }
    # two seeds averaged, with their range; 4 steps of the guidance-embedded student = 4 evaluations
    assert "| 2 | 0.580 [0.570-0.590] | 1100.000 [1050.000-1150.000] | 4 |" in lines["| searched_lcm | 4"]
    assert "| 20.00 | 30% / 50% / 10% / 10% |" in lines["| searched_lcm | 4"]
    assert "| 1 | 0.500 | 900.000 | 4 |" in lines["| searched_lcm@g4 | 4"]  # another guidance: its own row
    assert "| 100 |" in lines["| baseline | 50"] and "| 60 |" in lines["| searched | 30"]  # CFG: 2 per step
    summary = json.loads((out / "rows.json").read_text())["summary"]
    macs = {
        name: arch_cost(load_arch(ARCHS / f"{name}.yaml"))["macs"] for name in ("tiny_stock", "tiny_flex")
    }
    assert summary["baseline@50"]["macs"] == 100 * macs["tiny_stock"]
    assert summary["searched_lcm@4"]["macs"] == 4 * macs["tiny_flex"]
    # 0.580 vs 0.600 is within 0.02; 1100 vs 1000 is within 10%; 20 images/s against 1
    assert "searched_lcm@4: alignment 0.580 vs 0.600 (within 0.02)" in text
    assert "Frechet distance 1100 vs 1000 (within 10%)" in text and "images/s 20.0x" in text
    # factors: 20/10 architecture, 12.5 steps, 10/5 folding; U-Net time per image 2.0 vs 0.02
    assert "architecture 2.00x" in text and "steps 12.5x" in text and "guidance folding 2.00x" in text
    assert "product 50.0x against 100.0x measured" in text
