"""The `few_step:` stage of `nas run` (issue #27): its schema, the plan it adds (a consistency
distillation with the `nas train` machinery and an evaluation with `--scheduler lcm`), the plan
check's refusals, the comparison rows, and one tiny experiment end to end with its resume."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from nas.cli import main
from tests.pipeline.test_own_data import plan_lines
from tests.pipeline.test_pipeline import stage_states, tiny_experiment, write
from tests.search.test_distill_search import teacher_arch_file

ROOT = Path(__file__).resolve().parents[2]


def few_step_experiment(tmp_path, few_step: dict | None = None, **changes) -> dict:
    """The tiny experiment of test_pipeline.py with a few_step: section."""
    return tiny_experiment(tmp_path, few_step={"max_steps": 3, "steps": [1, 2]} if few_step is None else few_step,
                           **changes)  # fmt: skip


def dry_run(tmp_path, exp: dict, capsys) -> dict[str, str]:
    path = write(tmp_path, exp)
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    return plan_lines(capsys)


def argv(block: str, command: str) -> list[str]:
    """The argv of the `nas COMMAND` line in a stage's dry-run block."""
    line = next(s.strip() for s in block.splitlines() if s.strip().startswith(f"nas {command} "))
    return shlex.split(line)


def test_schema_defaults_and_an_absent_section():
    from nas.pipeline.experiment import STAGES, Experiment
    from nas.pipeline.few_step import FewStepStage

    fs = FewStepStage()
    assert (fs.teacher, fs.config, fs.max_steps, fs.set, fs.distill) == ("trained", None, None, [], {})
    assert (fs.steps, fs.guidance, fs.skip) == ([1, 2, 4, 8], 8.0, False)
    base = {"name": "x", "data": {"shapes": {}}, "search": {"space": "s.yaml"}}
    assert Experiment.model_validate(base).few_step is None
    assert Experiment.model_validate({**base, "few_step": None}).few_step is None
    assert Experiment.model_validate({**base, "few_step": {}}).few_step == fs
    assert STAGES.index("evaluate") < STAGES.index("few_step") < STAGES.index("report")


def test_no_section_no_stage(tmp_path, capsys):
    plan = dry_run(tmp_path, tiny_experiment(tmp_path, few_step=None), capsys)
    assert "few_step" not in plan and "evaluate" in plan


def test_plan_distils_the_trained_run_and_evaluates_with_lcm(tmp_path, capsys):
    plan = dry_run(tmp_path, few_step_experiment(tmp_path, {"distill": {"w_min": 3.0}}), capsys)
    root = tmp_path / "r" / "tiny"
    train = argv(plan["few_step"], "train")
    assert train[train.index("--arch") + 1] == str(root / "few_step" / "arch.yaml")
    assert train[train.index("--out") + 1] == str(root / "few_step" / "run")
    assert train[train.index("--max-steps") + 1] == "6"  # train.max_steps
    sets = train[train.index("--set") + 1 :]
    assert sets[:4] == ["val_items=8", "batch_size=4", "checkpoint_every=3", "val_every=3"]  # train.set first
    assert sets[4:] == ["cfg_drop=0.0", "ema=null", "distill.kind=consistency",
                        f"distill.teacher={root / 'train' / 'run'}", "distill.init=inherit", "distill.w_min=3.0"]  # fmt: skip
    ev = argv(plan["few_step"], "eval")
    assert ev[2] == str(root / "few_step" / "run") and ev[ev.index("--scheduler") + 1] == "lcm"
    assert ev[ev.index("--guidance") + 1] == "8.0" and ev[ev.index("--n") + 1] == "4"  # evaluate.n
    assert ev[ev.index("--steps") + 1 : ev.index("--steps") + 3] == ["1", "2"]
    assert ev[ev.index("--evaluator") + 1] == str(root / "data" / "evaluator")
    assert ev[ev.index("--out") + 1] == str(root / "few_step" / "eval")


def test_plan_with_its_own_config_and_the_teacher_stage(tmp_path, capsys):
    exp = few_step_experiment(tmp_path, {"teacher": "teacher", "config": "tiny", "set": ["batch_size=2"],
                                         "steps": [1], "guidance": 4.0},
                              teacher={"train": {"config": "tiny", "arch": teacher_arch_file(tmp_path), "max_steps": 3}},
                              evaluate={"steps": [2], "n": 4, "args": {"guidance": 3.0, "k": 4}})  # fmt: skip
    plan = dry_run(tmp_path, exp, capsys)
    train = argv(plan["few_step"], "train")
    sets = train[train.index("--set") + 1 :]
    teacher = tmp_path / "r" / "tiny" / "teacher" / "run"
    assert sets[0] == "cfg_drop=0.0" and sets[-1] == "batch_size=2" and "val_items=8" not in sets
    assert f"distill.teacher={teacher}" in sets and "--max-steps" not in train  # the config's
    ev = argv(plan["few_step"], "eval")  # evaluate.args but its own guidance
    assert ev[ev.index("--guidance") + 1] == "4.0" and ev[ev.index("--k") + 1] == "4"


def test_fingerprints(tmp_path):
    """The section changes no other stage's fingerprint; the stage follows the train stage (its teacher)."""
    from nas.pipeline.plan import fingerprint, plan
    from nas.pipeline.runner import load_experiment

    def prints(exp: dict) -> dict[str, str]:
        loaded = load_experiment(write(tmp_path, exp))
        stages = plan(loaded, tmp_path / "exp.yaml", tmp_path / "r")
        fingerprint(stages, loaded)
        return {s.name: s.fingerprint for s in stages}

    without, with_ = prints(tiny_experiment(tmp_path)), prints(few_step_experiment(tmp_path))
    assert {k: v for k, v in with_.items() if k != "few_step"} == without and with_["few_step"]
    longer = few_step_experiment(tmp_path)
    longer["train"]["max_steps"] = 8
    assert prints(longer)["few_step"] != with_["few_step"]
    skipped = prints(few_step_experiment(tmp_path, {"skip": True, "teacher": "teacher"}))
    assert skipped["few_step"] == "" and {k: v for k, v in skipped.items() if k != "few_step"} == without


REFUSED = [  # (case, few_step section or experiment changes, what the one line says)
    ("unknown key", {"stepz": [1]}, "few_step.stepz: unknown key; did you mean `steps`?"),
    ("bad teacher", {"teacher": "mine"}, "few_step.teacher: Input should be 'trained' or 'teacher'"),
    ("no teacher stage", {"teacher": "teacher"}, "few_step.teacher: 'teacher' distils the experiment's teacher:"),
    ("too many steps", {"steps": [1, 60]}, "few_step.steps: 60: --scheduler lcm samples 1..50 steps"),
    ("zero steps", {"steps": [0]}, "few_step.steps.0: Input should be greater than or equal to 1"),
    ("teacher set by nas run", {"distill": {"teacher": "x"}}, "few_step.distill.teacher: set by nas run"),
    ("kind set by nas run", {"distill": {"kind": "bk_sdm"}}, "few_step.distill.kind: set by nas run"),
    ("bk_sdm key", {"distill": {"output": 1.0}}, "few_step.distill.output: unknown key (allowed: init, num_ddim_timesteps"),
    ("bad distill value", {"distill": {"w_min": 9.0, "w_max": 3.0}}, "few_step.distill: (top level): Value error, w_min 9.0 > w_max 3.0"),
    ("other grid", {"distill": {"num_ddim_timesteps": 25}}, "few_step.distill.num_ddim_timesteps: 25: nas eval's lcm scheduler"),
    ("baked guidance", {"distill": {"guidance_embedding": False}}, "few_step.guidance: 8: a student without a guidance embedding"),
    ("bad set", {"set": ["lrr=1"]}, "few_step.set: --set: lrr: unknown key"),
    ("bad config", {"config": "tiny_typo"}, "few_step.config: unknown preset 'tiny_typo'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "section", "needle"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_section_is_one_line_before_the_first_stage(tmp_path, capsys, case, section, needle):
    path = write(tmp_path, few_step_experiment(tmp_path, section))
    results = tmp_path / "r"
    assert main(["run", path, "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: " in err and needle in err, err
    assert not results.exists()


def test_evaluation_without_the_evaluate_stage_is_refused_and_training_only_is_not(tmp_path, capsys):
    path = write(tmp_path, few_step_experiment(tmp_path, evaluate={"skip": True}))
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "few_step.steps: the few-step evaluation shares the evaluate stage's" in err
    )
    assert "few_step.steps: [] to train the student only" in err
    plan = dry_run(tmp_path, few_step_experiment(tmp_path, {"steps": []}, evaluate={"skip": True}), capsys)
    assert "nas train " in plan["few_step"] and "nas eval " not in plan["few_step"]


def _report(scheduler: str, guidance: float, steps: list[int], split: bool) -> dict:
    rows = []
    for s in steps:
        row = {"steps": s, "alignment": 0.5 + s / 100, "chance_alignment": 0.2, "frechet_distance": 90.0 - s,
               "seconds": 1.0, "images_per_s": 4.0 / s}  # fmt: skip
        if split:
            row["split"] = {"text_encoder_s": 0.1, "unet_s": 0.5 * s, "vae_decode_s": 0.2,
                            "unet_evals_per_image": float(s)}  # fmt: skip
        rows.append(row)
    return {"scheduler": scheduler, "guidance": guidance, "results": rows}


def test_comparison_rows_count_unet_calls_and_show_the_split_when_there(tmp_path):
    from nas.pipeline.comparison import few_step_rows, write_few_step

    rows = few_step_rows(_report("ddim", 7.5, [10, 20], split=False), _report("lcm", 8.0, [1, 4], split=True))
    assert [(r["run"], r["steps"], r["unet_calls_per_image"]) for r in rows] == [
        ("main", 10, 20.0), ("main", 20, 40.0), ("few_step", 1, 1.0), ("few_step", 4, 4.0)]  # fmt: skip
    assert "split_s" not in rows[0] and rows[3]["split_s"] == {
        "text_encoder": 0.1,
        "unet": 2.0,
        "vae_decode": 0.2,
    }
    assert rows[2]["alignment"] == 0.51 and rows[2]["images_per_s"] == 4.0 and rows[2]["scheduler"] == "lcm"
    unguided = few_step_rows(_report("ddim", 1.0, [10], False), _report("lcm", 8.0, [2], False))
    assert [r["unet_calls_per_image"] for r in unguided] == [10.0, 2.0]  # guidance 1: one call per step
    assert [r["run"] for r in few_step_rows(None, _report("lcm", 8.0, [2], False))] == ["few_step"]
    write_few_step(rows, tmp_path)
    table = (tmp_path / "comparison.md").read_text()
    assert "| few-step student | lcm | 4 | 8 | 4 | 0.540 | 86.0 | 1.00 | 0.10 / 2.00 / 0.20 |" in table
    assert "| main (train stage) | ddim | 10 | 7.5 | 20 | 0.600 | 80.0 | 0.40 | - |" in table
    assert json.loads((tmp_path / "comparison.json").read_text())["rows"] == rows


def test_example_file_plans(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = "experiments/few_step_example.yaml"
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    plan = plan_lines(capsys)
    assert "--scheduler lcm --steps 1 2 4 8" in plan["few_step"] and not (tmp_path / "r").exists()


# about 35 s on a shared 2-core machine: the tiny flow (without sample and report) plus 3 consistency
# steps and an evaluation at 1 and 2 steps
def test_few_step_stage_end_to_end_and_resumed(tmp_path, capsys):
    results = tmp_path / "results"
    path = write(tmp_path, few_step_experiment(tmp_path, sample={"skip": True}, report={"skip": True}))
    assert main(["run", path, "--results", str(results)]) == 0
    root = results / "tiny"
    run, report = (
        root / "few_step" / "run",
        json.loads((root / "few_step" / "eval" / "eval.json").read_text()),
    )
    assert (run / "config.yaml").is_file() and (run / "final").is_dir()
    assert report["scheduler"] == "lcm" and report["guidance"] == 8.0 and report["steps"] == [1, 2]
    assert [r["steps"] for r in report["results"]] == [1, 2]
    arch = (root / "few_step" / "arch.yaml").read_text()
    assert "time_cond_proj_dim: 256" in arch
    summary = json.loads((root / "summary.json").read_text())
    rows = summary["few_step_comparison"]
    assert [(r["run"], r["steps"]) for r in rows] == [
        ("main", 2),
        ("main", 3),
        ("few_step", 1),
        ("few_step", 2),
    ]
    assert [r["unet_calls_per_image"] for r in rows] == [4.0, 6.0, 1.0, 2.0]  # CFG: 2 per step; the student 1
    assert all(r["images_per_s"] > 0 and 0 <= r["alignment"] <= 1 for r in rows)
    assert "few_step_alignment_1_steps" in summary and "few_step_domain_fid_2_steps" in summary
    assert (root / "few_step.md").is_file() and (root / "few_step_eval.json").is_file()
    first = stage_states(results)
    assert first["few_step"]["done"]

    capsys.readouterr()
    assert main(["run", path, "--results", str(results)]) == 0  # nothing changed: skipped
    out = capsys.readouterr().out
    assert "few_step: done, inputs unchanged" in out and stage_states(results) == first

    # Interrupted during its evaluation: the rerun resumes the stage (training from its checkpoint,
    # nothing before it redone) and evaluates again.
    state = dict(first["few_step"], done=False)
    (root / "few_step" / "stage.json").write_text(json.dumps(state))
    (root / "few_step" / "eval" / "eval.json").unlink()
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["run", path, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "few_step: resuming" in out and out.count("inputs unchanged") == 7  # data .. train, evaluate
    after = stage_states(results)
    assert after["few_step"]["done"] and after["few_step"]["fingerprint"] == first["few_step"]["fingerprint"]
    assert after["few_step"]["seconds"] >= first["few_step"]["seconds"]  # the attempts add up
    assert (root / "few_step" / "eval" / "eval.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints
    assert not list(root.glob("few_step.superseded-*"))

    # The section removed: no stage, and its copies leave results/<experiment>/ (its folder stays).
    path = write(tmp_path, tiny_experiment(tmp_path, sample={"skip": True}, report={"skip": True}))
    assert main(["run", path, "--results", str(results)]) == 0
    summary = json.loads((root / "summary.json").read_text())
    assert "few_step_comparison" not in summary and not (root / "few_step.md").exists()
    assert (root / "few_step" / "eval" / "eval.json").is_file()
