"""`nas run`: a tiny experiment end to end, stage caching by content, --from, resume after SIGKILL,
and bad experiment files."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from nas.cli import main
from tests.fixtures.space import SPACES


def tiny_experiment(tmp_path, **changes) -> dict:
    space = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    space["baselines"] = [str(SPACES / rel) for rel in space["baselines"]]
    space["proxy"].update(steps=6, report_every=3)
    space["proxy"]["overrides"].update(val_items=8)
    space["latency"] = {"device": "cpu", "batch": 1, "warmup": 0, "iters": 1}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    exp = {
        "name": "tiny",
        "data": {"shapes": {"n": 60, "size": 32, "seed": 0}, "evaluator": {"steps": 20, "train_images": 200}},
        "vae": {"args": {"steps": 10, "batch": 8}},
        "search": {"space": "space.yaml", "trials": 2},
        "export": {"pick": "best"},
        "train": {
            "config": "tiny",
            "max_steps": 6,
            "set": ["val_items=8", "batch_size=4", "checkpoint_every=3", "val_every=3"],
        },
        "sample": {"prompts": ["a red circle on a white background"], "steps": 2, "n": 1},
        "evaluate": {"steps": [2, 3], "n": 4},
    }
    exp.update(changes)
    return exp


def write(tmp_path, exp) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return str(path)


def stage_states(results):
    paths = (results / "tiny").glob("*/stage.json")
    return {p.parent.name: json.loads(p.read_text()) for p in paths if ".superseded-" not in p.parent.name}


@pytest.mark.slow
def test_tiny_experiment_end_to_end_and_cached_rerun(tmp_path, capsys):
    results = tmp_path / "results"
    path = write(tmp_path, tiny_experiment(tmp_path))
    assert main(["run", path, "--results", str(results)]) == 0
    summary = json.loads((results / "tiny" / "summary.json").read_text())
    for key in (
        "alignment_accuracy_3_steps",
        "domain_fid_3_steps",
        "best_params",
        "best_macs",
        "best_latency_ms",
        "wall_seconds",
    ):
        assert key in summary
    for name in ("pareto.png", "arch.yaml", "grid.png", "quality_vs_steps.png"):
        assert (results / "tiny" / name).is_file()
    first = stage_states(results)
    assert all(s["done"] for s in first.values()) and len(first) == 9

    capsys.readouterr()
    assert main(["run", path, "--results", str(results)]) == 0  # nothing changed: every stage skipped
    assert capsys.readouterr().out.count("skipped") == 9
    assert stage_states(results) == first

    changed = tiny_experiment(tmp_path)
    changed["train"]["max_steps"] = 8  # train and what follows it must redo; earlier stages not
    path = write(tmp_path, changed)
    assert main(["run", path, "--results", str(results)]) == 0
    after = stage_states(results)
    for stage in ("data", "vae", "precompute", "search", "export"):
        assert after[stage] == first[stage]
    for stage in ("train", "sample", "evaluate", "report"):
        assert after[stage]["fingerprint"] != first[stage]["fingerprint"]

    assert main(["run", path, "--results", str(results), "--from", "sample"]) == 0
    again = stage_states(results)
    assert again["train"] == after["train"] and again["sample"]["updated"] >= after["sample"]["updated"]


@pytest.mark.parametrize(
    "edit, same",
    [
        ("# a new comment\nlr: 1.0e-3  # its unit\nmax_steps: 10\n", True),  # comments and layout
        ("max_steps: 10\nlr: 0.001\n", True),  # key order, number spelling
        ("lr: 1.0e-3\nmax_steps: 11\n", False),  # a value
    ],
)
def test_yaml_inputs_are_fingerprinted_by_content(tmp_path, edit, same):
    from nas.pipeline.plan import _digest

    path = tmp_path / "train.yaml"
    path.write_text("lr: 1.0e-3\nmax_steps: 10\n")
    before = _digest(path)
    path.write_text(edit)
    assert (_digest(path) == before) is same


def test_dry_run_prints_the_plan(tmp_path, capsys):
    path = write(tmp_path, tiny_experiment(tmp_path))
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("data", "vae", "precompute", "search", "export", "train", "sample", "evaluate", "report"):
        assert f"\n{stage}" in "\n" + out
    assert "nas search" in out and not (tmp_path / "r").exists()


BAD = [
    ("unknown key", {"colour": "red"}, "colour: unknown key"),
    ("unknown stage key", {"train": {"config": "tiny", "epochs": 3}}, "train.epochs: unknown key"),
    (
        "bad flag",
        {"vae": {"args": {"wings": 2}}},
        "vae.args.wings: unknown setting (allowed: resolution, channels,",
    ),
    ("missing data", {"data": {"path": "no/such/folder"}}, None),
]


@pytest.mark.parametrize(("case", "change", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_experiment_is_one_line_exit_2(tmp_path, capsys, case, change, needle):
    path = write(tmp_path, tiny_experiment(tmp_path, **change))
    code = main(["run", path, "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    if needle:
        assert needle in err


PLAN_ERRORS = [  # refused before the first stage: nothing is run, nothing is written
    ("sampler", {"search": {"space": "space.yaml", "sampler": "tpee"}},
     "search.sampler: Input should be 'tpe', 'nsga2', 'random' or 'gp'"),
    ("train preset", {"train": {"config": "tiny_typo"}},
     "train.config: unknown preset 'tiny_typo' (allowed: decidiffusion, sd15, tiny"),
    ("missing space", {"search": {"space": "nope.yaml"}}, "search.space: "),
    ("bad --set", {"train": {"config": "tiny", "set": ["lrr=1"]}}, "train.config: --set: lrr: unknown key"),
    ("bad evaluator setting", {"data": {"shapes": {"n": 60}, "evaluator": {"steps": 0}}},
     "data.evaluator.steps: Input should be greater than or equal to 1"),
    ("missing variant arch", {"variants": {"runs": [{"name": "b", "arch": "no_arch.yaml"}]}},
     "variants.runs.0.arch: "),
]  # fmt: skip


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize(("case", "change", "needle"), PLAN_ERRORS, ids=[p[0] for p in PLAN_ERRORS])
def test_plan_is_checked_before_the_first_stage(tmp_path, capsys, case, change, needle, dry_run):
    path = write(tmp_path, tiny_experiment(tmp_path, **change))
    results = tmp_path / "r"
    code = main(["run", path, "--results", str(results), *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{path}: " in err and needle in err, err
    assert not results.exists()


def test_unknown_from_stage(tmp_path, capsys):
    path = write(tmp_path, tiny_experiment(tmp_path))
    assert main(["run", path, "--from", "deploy", "--results", str(tmp_path / "r")]) == 2
    assert "--from: unknown value 'deploy' (allowed: data, vae" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkilled_run_resumes_without_redoing_finished_stages(tmp_path):
    results = tmp_path / "results"
    path = write(tmp_path, tiny_experiment(tmp_path, train={"config": "tiny", "max_steps": 60, "set": [
        "val_items=8", "batch_size=4", "checkpoint_every=5", "val_every=20"]}))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nas", "run", path, "--results", str(results)]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not list(
        (results / "tiny" / "train" / "run" / "checkpoints").glob("step_*")
    ):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stage_states(results)
    assert before["export"]["done"] and not before["train"]["done"]
    subprocess.run(cmd, env=env, check=True, timeout=600, stdout=subprocess.DEVNULL)
    after = stage_states(results)
    for stage in ("data", "vae", "precompute", "search", "export"):
        assert after[stage] == before[stage]  # not redone
    assert all(s["done"] for s in after.values())


def with_variants(tmp_path, **changes) -> dict:
    variants = {
        "workers": 2,
        "compare": {"baseline": "base", "candidate": "main", "match_steps": 3, "ablation_steps": 2},
        "runs": [
            {"name": "base", "arch": str(SPACES / "archs" / "tiny_stock.yaml"), "config": "tiny",
             "set": ["val_items=8", "batch_size=4", "diffusion.schedule=scaled_linear", "diffusion.prediction=epsilon",
                     "diffusion.zero_terminal_snr=false"], "eval": {"spacing": "leading"}},
            {"name": "raw", "reuse": "main", "ablates": "EMA", "eval": {"weights": "raw", "steps": [2]}},
        ],
    }  # fmt: skip
    variants.update(changes)
    return tiny_experiment(tmp_path, variants=variants)


BAD_VARIANTS = [
    ("arch and reuse", {"runs": [{"name": "x", "arch": "searched", "reuse": "main"}]}, "exactly one of arch"),
    ("reuse unknown", {"runs": [{"name": "x", "reuse": "nope"}]}, "reuse 'nope' is not a trained run"),
    ("compare unknown", {"compare": {"baseline": "ghost"}}, "compare.baseline: unknown run 'ghost'"),
    (
        "duplicate",
        {"runs": [{"name": "x", "reuse": "main"}, {"name": "x", "reuse": "main"}]},
        "duplicate variant",
    ),
    ("bad weights", {"runs": [{"name": "x", "reuse": "main", "eval": {"weights": "best"}}]}, "weights"),
    ("match steps not evaluated", {"compare": {"baseline": "main", "match_steps": 50}},
     "compare.match_steps 50 is not among the step counts evaluated for main (2, 3)"),
    ("ablation steps not evaluated", {"compare": {"baseline": "main", "match_steps": 3, "ablation_steps": 3}},
     "compare.ablation_steps 3 is not among the step counts evaluated for raw (2)"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "needle"), BAD_VARIANTS, ids=[b[0] for b in BAD_VARIANTS])
def test_bad_variants_are_one_line_exit_2(tmp_path, capsys, case, change, needle):
    path = write(tmp_path, with_variants(tmp_path, **change))
    code = main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert needle in err


def test_variants_plan_trains_and_reuses(tmp_path, capsys):
    path = write(tmp_path, with_variants(tmp_path))
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("\nvariants") : out.index("\nreport")]
    assert block.count("nas train") == 1 and block.count("nas eval") == 2
    assert "variants/base/run" in block and "--spacing leading" in block
    assert "--weights raw" in block and "tiny/train/run" in block  # the reuse evaluates the main run


MATCH = [  # candidate alignment by steps, baseline alignment at 50 -> fewest steps that match
    ({10: 0.5, 30: 0.7, 50: 0.8}, 0.7, 30),
    ({10: 0.5, 30: 0.69, 50: 0.8}, 0.7, 50),  # no tolerance: 0.69 < 0.70
    ({10: 0.5, 30: 0.6, 50: 0.65}, 0.7, None),
]


@pytest.mark.parametrize(("cand", "target", "expected"), MATCH)
def test_steps_to_match_is_strict(cand, target, expected):
    from nas.pipeline.comparison import steps_to_match

    candidate = {"quality": {s: {"alignment": a, "frechet_distance": 100 - 100 * a} for s, a in cand.items()}}
    baseline = {"quality": {50: {"alignment": target, "frechet_distance": 100 - 100 * target}}}
    assert steps_to_match(candidate, baseline, 50, "alignment") == expected
    assert steps_to_match(candidate, baseline, 50, "frechet_distance") == expected


CAVEATS = [  # match (alignment, FD), baseline gain 10 -> 50 (alignment, FD) -> which caveats print
    ((30, 30), (0.05, 200.0), []),  # matched above the fewest steps, baseline improves: none
    ((10, 30), (0.05, 200.0), ["upper bound"]),
    ((30, 30), (-0.01, 200.0), ["gains little"]),  # flat alignment is enough to say so
    ((10, 10), (0.0, -5.0), ["upper bound", "gains little"]),
]


@pytest.mark.parametrize(("match", "gain", "expected"), CAVEATS)
def test_comparison_says_when_step_figures_are_bounds(match, gain, expected):
    from nas.pipeline.comparison import _match_caveats

    compare = {"match_steps": 50, "fewest_steps_evaluated": 10, "steps_to_match_baseline_50": match[0],
               "steps_to_match_baseline_50_fd": match[1], "baseline_alignment_gain": gain[0],
               "baseline_fd_gain": gain[1]}  # fmt: skip
    notes = _match_caveats(compare)
    assert [k for k in ("upper bound", "gains little") if any(k in n for n in notes)] == expected


def test_comparison_grids_show_baseline_then_candidate_at_its_match(tmp_path):
    from PIL import Image

    from nas.pipeline.comparison import _grid_panels, _plot_grids

    def run(name, steps, label):
        folder = tmp_path / name
        folder.mkdir()
        for s in steps:
            Image.new("RGB", (786, 786), "white").save(folder / f"grid_{s:03d}.png")
        return {"label": label, "eval_dir": str(folder), "quality": {s: {} for s in steps}}

    result = {"runs": {"main": run("main", (10, 20, 50), "cand"), "base": run("base", (10, 50), "base"),
                       "abl": run("abl", (30,), "abl"), "gone": {"label": "gone", "quality": {50: {}}}},
              "compare": {"baseline": "base", "candidate": "main", "match_steps": 50,
                          "steps_to_match_baseline_50": 20}}  # fmt: skip
    assert [t for t, _ in _grid_panels(result)] == ["base: 50 steps", "cand: 20 steps", "cand: 50 steps"]
    _plot_grids(result, tmp_path / "grids.png")
    assert Image.open(tmp_path / "grids.png").height > Image.open(tmp_path / "grids.png").width / 4


@pytest.mark.slow
def test_variants_stage_trains_compares_and_resumes(tmp_path, capsys):
    results = tmp_path / "results"
    path = write(tmp_path, with_variants(tmp_path))
    assert main(["run", path, "--results", str(results)]) == 0
    root = results / "tiny"
    comparison = json.loads((root / "variants" / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"main", "base", "raw"}
    assert (
        comparison["runs"]["raw"]["weights"] == "raw" and comparison["runs"]["base"]["spacing"] == "leading"
    )
    summary = json.loads((root / "summary.json").read_text())
    assert summary["per_step_speedup"] > 0 and "steps_to_match_baseline_3" in summary
    assert [a["ablates"] for a in comparison["ablations"]] == ["EMA"]
    for name in ("comparison.md", "comparison.png", "comparison_grids.png"):
        assert (root / name).is_file()
    state = json.loads((root / "variants" / "state.json").read_text())
    assert len(state["done"]) == 3
    # An interrupted variants stage: forget one finished command; the rerun redoes only that one.
    stage = json.loads((root / "variants" / "stage.json").read_text())
    stage["done"] = False
    (root / "variants" / "stage.json").write_text(json.dumps(stage))
    key = next(k for k in state["done"] if "--weights raw" in k)
    del state["done"][key]
    (root / "variants" / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["run", path, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "2/3 commands done before" in out and "variant raw: eval done" in out and "variant base" not in out


def _fake_execute(stage, folder, exp_path, resume, exp):
    """Stand-in for the stage commands: the files the summary reads, with absolute paths in them."""
    (folder / "out.txt").write_text(f"{stage.name} {stage.fingerprint}\n")
    if stage.name == "export":
        card = {"params": 1, "macs": 2, "latency_ms_p50": 3.0, "proxy_loss": 0.5, "trial": 0}
        (folder / "card.json").write_text(json.dumps(card))
    if stage.name == "evaluate":
        root = folder.parent
        report = {"run": str(root / "train" / "run"), "evaluator": str(root / "data" / "evaluator"), "seed": 0,
                  "results": [{"steps": 2, "alignment": 0.5, "chance_alignment": 0.2, "frechet_distance": 9.0}]}  # fmt: skip
        (folder / "eval").mkdir()
        (folder / "eval" / "eval.json").write_text(json.dumps(report))


def _absolute_paths(data) -> list[str]:
    if isinstance(data, dict):
        return [p for v in data.values() for p in _absolute_paths(v)]
    if isinstance(data, list):
        return [p for v in data for p in _absolute_paths(v)]
    return [data] if isinstance(data, str) and os.path.isabs(data) else []


def test_redone_stage_is_moved_aside_and_results_are_self_contained(tmp_path, monkeypatch):
    from nas.pipeline import runner

    monkeypatch.setattr(runner, "_execute", _fake_execute)
    results = tmp_path / "results"
    path = write(tmp_path, tiny_experiment(tmp_path))
    assert main(["run", path, "--results", str(results)]) == 0
    root = results / "tiny"
    first = (root / "evaluate" / "out.txt").read_text()
    assert main(["run", path, "--results", str(results), "--from", "evaluate"]) == 0
    aside = sorted(root.glob("evaluate.superseded-*"))
    assert len(aside) == 1 and (aside[0] / "out.txt").read_text() == first  # moved, not deleted
    assert (aside[0] / "eval" / "eval.json").is_file() and (root / "evaluate" / "stage.json").is_file()
    assert (root / "train" / "out.txt").is_file() and not list(root.glob("train.superseded-*"))

    report = json.loads((root / "eval.json").read_text())
    assert report["run"] == "train/run" and _absolute_paths(report) == []
    run = json.loads((root / "run.json").read_text())
    assert run["seeds"]["data"] == 0 and run["seeds"]["evaluate"] == 0 and run["environment"]["python"]
    assert set(run["stages"]) == set(stage_states(results))  # the folders moved aside are not stages
    assert str(root) not in json.dumps(run["stages"])  # commands name stage folders relatively
    assert yaml.safe_load((root / "experiment.yaml").read_text())["name"] == "tiny"
