"""Proxy distillation in the search (`proxy: distill:`, `nas search --teacher`) and the `teacher:`
section of `nas run`: trials inherit and distil, the teacher is loaded once per process, and a
teacher that cannot seed the space is refused before any trial."""

import copy
import os

import pytest
import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.core.errors import NasError
from nas.search.study import SearchSettings, run_search
from tests.pipeline.test_pipeline import tiny_experiment, write

# The largest point of search_spaces/tiny.yaml (its settings, every maximum): seeds every point.
TEACHER = {
    "name": "teacher",
    "settings": {"latent_channels": 4, "latent_size": 8, "cross_attention_dim": 384, "text_len": 32,
                 "norm_num_groups": 8},
    "levels": [
        {"channels": 32, "resnets": 2, "attentions": 1, "up_attentions": 2, "head_dim": 8},
        {"channels": 32, "resnets": 1, "attentions": 2, "up_attentions": 2, "head_dim": 8},
    ],
    "mid": {"resnets": 2, "attentions": 1},
}  # fmt: skip


def save_teacher(folder, **changes):
    """A randomly initialised U-Net saved as a diffusers folder (what `teacher_arch` reads)."""
    from nas.space import build_unet
    from nas.space.build import arch_from_dict

    data = copy.deepcopy(TEACHER)
    data.update(changes)
    build_unet(arch_from_dict(data, "teacher")).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("teacher") / "unet")


@pytest.fixture
def counted_loads(monkeypatch):
    import nas.search.teacher
    import nas.teacher.arch

    monkeypatch.setattr(nas.search.teacher, "_TEACHERS", {})  # no teacher cached by an earlier test
    real, calls = nas.teacher.arch.load_teacher, []

    def load(path, what="teacher"):
        calls.append(path)
        return real(path, what)

    monkeypatch.setattr(nas.teacher.arch, "load_teacher", load)
    return calls


def distill_space(space_file, teacher, **distill):
    return space_file("distill", proxy={
        "steps": 4, "report_every": 2, "recipe": "tiny", "pruner": "none",
        "overrides": {"batch_size": 4, "val_items": 8, "val_timesteps": 2, "warmup_steps": 0},
        "distill": {"teacher": str(teacher), **distill},
    })  # fmt: skip


def search(space, cache, tmp_path, trials=2, **kw):
    s = SearchSettings(space=str(space), study="d", trials=trials, cache=str(cache),
                       results=str(tmp_path / "results"), **kw)  # fmt: skip
    return run_search(s, quiet=True)


def test_trials_inherit_and_distil_with_one_teacher_load(search_cache, space_file, tmp_path, teacher_dir,
                                                         counted_loads):  # fmt: skip
    space = distill_space(space_file, os.path.relpath(teacher_dir, tmp_path))  # relative to it
    study = search(space, search_cache, tmp_path)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        a = t.user_attrs
        assert a["inherit_copied"] + a["inherit_sliced"] + a["inherit_new"] == a["params"]
        assert a["inherit_copied"] > 0 and "tensors" in a["inherit_summary"]
        assert 0 < a["teacher_s"] < a["step_s"]
    assert len(counted_loads) == 1  # once for the process, not per trial
    written = yaml.safe_load((tmp_path / "results" / "d" / "space.yaml").read_text())
    assert written["proxy"]["distill"]["teacher"] == str(teacher_dir.resolve())


def test_teacher_flag_sets_the_proxy_teacher(search_cache, space_file, tmp_path, teacher_dir, counted_loads):
    study = search(space_file(), search_cache, tmp_path, trials=1, teacher=str(teacher_dir))
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and "inherit_copied" in trial.user_attrs
    assert len(counted_loads) == 1


REFUSED = [  # teacher -> message; refused before any trial, from the config alone
    ("missing", lambda tmp: tmp / "nope", "teacher folder not found"),
    ("no U-Net", lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no U-Net in the teacher folder"),
    ("narrower", lambda tmp: save_teacher(tmp / "narrow", levels=[{**TEACHER["levels"][0], "channels": 16},
                                                                   TEACHER["levels"][1]]),
     "levels.0.channels: the space allows 32, the teacher has 16"),
    ("shallower", lambda tmp: save_teacher(tmp / "one", levels=TEACHER["levels"][:1]),
     "levels.1: the teacher has no level"),
    ("other text", lambda tmp: save_teacher(tmp / "text", settings={**TEACHER["settings"],
                                                                     "cross_attention_dim": 64}),
     "settings.cross_attention_dim"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "needle"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_teacher_is_refused_before_any_trial(search_cache, space_file, tmp_path, counted_loads, capsys,
                                                 case, make, needle):  # fmt: skip
    space = distill_space(space_file, make(tmp_path))
    with pytest.raises(NasError, match=r"proxy\.distill\.teacher: ") as info:
        search(space, search_cache, tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "results").exists() and counted_loads == []
    code = main(["search", str(space), "--study", "d", "--results", str(tmp_path / "r"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_decidiffusion_layouts_in_the_space(space_file, tmp_path, teacher_dir, capsys):
    """Interleaved transformers inherit from a stacked teacher; a half-resolution mid block needs a
    teacher block one resolution below the space's deepest level, which this teacher lacks."""
    for changes, code in (({"attention_layout": ["stacked", "interleaved"]}, 0),
                          ({"mid": {"resolution": ["same", "half"]}}, 2)):  # fmt: skip
        space = space_file("layout", **changes)
        argv = ["search", str(space), "--study", "d", "--teacher", str(teacher_dir), "--dry-run"]
        assert main(argv) == code
        err = capsys.readouterr().err
        if code:
            assert err.count("\n") == 1 and "mid.resolution: the student's is 'half'" in err, err


def test_dry_run_shows_the_resolved_teacher(space_file, teacher_dir, capsys):
    argv = ["search", str(space_file()), "--study", "d", "--teacher", str(teacher_dir), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(teacher_dir.resolve()) in out and '"init": "inherit"' in out


# ---- nas run: the teacher section -------------------------------------------------------------


def teacher_arch_file(tmp_path, **changes) -> str:
    data = copy.deepcopy(TEACHER)
    data.update(changes)
    (tmp_path / "teacher_arch.yaml").write_text(yaml.safe_dump(data))
    return "teacher_arch.yaml"


def test_experiment_with_a_teacher_folder_plans(tmp_path, teacher_dir, capsys):
    exp = tiny_experiment(tmp_path, teacher={"path": str(teacher_dir)})
    exp["train"]["distill"] = {"output": 1.0, "feature": 0.5}
    path = write(tmp_path, exp)
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\nteacher " in out and f"--teacher {teacher_dir}" in out
    assert "distill.feature=0.5" in out and not (tmp_path / "r").exists()


def test_experiment_trains_its_teacher_first(tmp_path, capsys):
    from nas.pipeline.plan import fingerprint, plan
    from nas.pipeline.runner import load_experiment

    exp = tiny_experiment(tmp_path, teacher={"train": {"config": "tiny", "arch": teacher_arch_file(tmp_path),
                                                       "max_steps": 3}})  # fmt: skip
    path = write(tmp_path, exp)
    assert main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "nas train" in out.split("\nteacher ")[1].split("\nsearch ")[0]
    loaded = load_experiment(path)
    stages = {s.name: s for s in plan(loaded, tmp_path / "exp.yaml", tmp_path / "r")}
    assert "teacher" in stages["search"].depends
    fingerprint(list(stages.values()), loaded)
    before = stages["search"].fingerprint
    teacher_arch_file(tmp_path, name="other")  # a changed teacher redoes the search
    stages = plan(loaded, tmp_path / "exp.yaml", tmp_path / "r")
    fingerprint(stages, loaded)
    assert next(s for s in stages if s.name == "search").fingerprint != before


PLAN_REFUSED = [
    ("missing teacher", lambda tmp: {"teacher": {"path": "nope"}}, "teacher: "),
    ("narrow teacher arch", lambda tmp: {"teacher": {"train": {"arch": teacher_arch_file(
        tmp, levels=[{**TEACHER["levels"][0], "channels": 16}, TEACHER["levels"][1]])}}},
     "teacher.train.arch: levels.0.channels"),
    ("both", lambda tmp: {"teacher": {"path": "x", "train": {"arch": "y"}}}, "give exactly one of path or train"),
    ("distill without teacher", lambda tmp: {"train": {"config": "tiny", "distill": {"output": 1.0}}},
     "train.distill: needs a teacher"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "needle"), PLAN_REFUSED, ids=[p[0] for p in PLAN_REFUSED])
def test_bad_teacher_section_is_refused(tmp_path, capsys, case, change, needle):
    path = write(tmp_path, tiny_experiment(tmp_path, **change(tmp_path)))
    code = main(["run", path, "--results", str(tmp_path / "r"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "r").exists()


def test_narrower_level_below_a_wider_one_gets_a_new_shortcut():
    """Teacher 32 -> 32 (identity skip) seeds student 16 -> 32 (1x1 shortcut): the shortcut is new."""
    from nas.space import build_unet
    from nas.space.build import arch_from_dict
    from nas.teacher.inherit import inherit

    teacher_arch = arch_from_dict(TEACHER, "teacher")
    student_data = copy.deepcopy(TEACHER)
    student_data["levels"][0]["channels"] = 16
    student_arch = arch_from_dict(student_data, "student")
    report = inherit(build_unet(teacher_arch), teacher_arch, build_unet(student_arch), student_arch)
    shortcut = next(s for s in report.steps if s.student == "down_blocks.1.resnets.0.conv_shortcut.weight")
    assert shortcut.status == "new" and shortcut.teacher is None
    assert report.counts()["sliced"][0] > 0
