"""`nas run EXPERIMENT.yaml`: the stages of an experiment, in order, each in
results/<experiment>/<stage>/ with its resolved config and a `stage.json` (fingerprint, done,
seconds, command).

A stage is the `nas` commands a user would type, built as the commands' settings models
(nas/core/settings.py) from the experiment file and the folders of the stages before it, so `nas run`
does exactly what the documented commands do; every stage's settings and every file a stage reads
(that no earlier stage writes) are checked before the first stage runs. Its fingerprint hashes
the resolved settings, the content of the files it reads (space, train config, prompts) and the
fingerprints of the stages it depends on: a rerun skips a stage whose fingerprint is unchanged and
finished, redoes one whose inputs changed (and everything after it), and resumes one that was
interrupted (precompute, search, train and few_step continue from what they saved; the others
start over).

Quality is measured offline with an evaluator: for `shapes` the data stage trains its classifier;
for a folder (`data.path`) the `evaluator` stage trains one on the latent cache after precompute
(`nas data train-evaluator --cache`); `evaluate.evaluator` names one made before instead. A stage
after `train` with `skip: true` is shown by --dry-run, not run, and no stage that runs may need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.core.config import read_yaml
from nas.core.errors import NasError
from nas.core.settings import CommandSettings, build, to_argv
from nas.pipeline.check import check_evaluation, check_few_step, check_inputs
from nas.pipeline.experiment import NOT_HASHED, STAGES, Experiment
from nas.pipeline.few_step import plan_few_step
from nas.pipeline.variants import SEARCHED, plan_variants

# rerun the same command to continue
RESUMABLE = {"precompute", "teacher", "search", "train", "few_step", "variants"}


@dataclass
class Stage:
    name: str
    commands: list[CommandSettings]  # `nas` commands, run in order (shown as their command lines)
    inputs: list[Path] = field(default_factory=list)  # files whose content the stage reads
    depends: list[str] = field(default_factory=list)
    fingerprint: str = ""
    jobs: dict[str, list[CommandSettings]] = field(default_factory=dict)  # variants: per variant
    skip: str = ""  # why the stage is left out ('evaluate: {skip: true}'); '' = it runs


class _Builder:
    """Builds each stage's settings from the experiment; errors name the experiment key."""

    def __init__(self, exp_path: Path):
        self.exp_path = exp_path
        self.keys: dict[int, dict[str, str]] = {}

    def __call__(self, model, values: dict[str, Any], where: str, keys: dict[str, str] | None = None,
                 user: dict[str, Any] | None = None, user_where: str = "") -> CommandSettings:  # fmt: skip
        """`values` set by the plan; `user` the experiment's extra settings (e.g. `vae.args`),
        which may not set what the plan sets."""
        keys = dict(keys or {})
        free = [n for n in model.model_fields if n not in values and n != "dry_run"]  # for `user`
        for key in user or {}:
            if key in model.model_fields and key not in free:
                raise NasError(f"{self.exp_path}: {user_where}.{key}: set by nas run, not in the experiment")
            keys[key] = f"{user_where}.{key}"

        def name_of(f: str) -> str:
            return keys.get(f, f"{where}.{f}")

        settings = build(model, {**(user or {}), **values}, name_of, f"{self.exp_path}: ", free)
        self.keys[id(settings)] = {f: name_of(f) for f in model.model_fields}
        return settings


def _path(base: Path, value: str) -> str:
    """A path written in the experiment file, relative to that file."""
    return value if Path(value).is_absolute() else os.path.normpath(base / value)


def _relative(base: Path, value: str) -> str:
    """A name (preset, 'minilm') or a path relative to the experiment file."""
    path = Path(value)
    if path.is_absolute() or not (base / path).exists():
        return value  # a name, an absolute path, or a path the check will report missing
    return os.path.normpath(base / path)


def plan(exp: Experiment, exp_path: Path, results: Path) -> list[Stage]:
    """The stages with their commands, folders and dependencies, every input checked (nothing is
    run or written)."""
    from nas.commands import data, eval, export, precompute, report, sample, search, train, vae

    make = _Builder(exp_path)
    base = exp_path.parent
    root = results / exp.name
    folder = {name: root / name for name in STAGES}
    stages: list[Stage] = []
    _check_skips(exp, exp_path)
    check_few_step(exp, exp_path)
    given = exp.evaluate.evaluator and _path(base, exp.evaluate.evaluator)  # an evaluator made before
    if exp.data.shapes is not None:
        shapes_dir = folder["data"] / "shapes"
        s = exp.data.shapes
        evaluator: str | None = str(folder["data"] / "evaluator")
        commands = [make(data.ShapesSettings, {"out": str(shapes_dir), "n": s.n, "size": s.size, "seed": s.seed},
                         "data.shapes")]  # fmt: skip
        if not given:  # its default size left unsaid, as before --size had one (the fingerprints stay)
            size = None if s.size == _shapes_evaluator_size() else s.size
            commands.append(make(data.EvaluatorSettings, {"out": evaluator, "data": str(shapes_dir), "size": size},
                                 "data", user=exp.data.evaluator, user_where="data.evaluator"))  # fmt: skip
        stages.append(Stage("data", commands))
        train_data = shapes_dir / "train"
    else:
        assert exp.data.path is not None  # DataStage's validator: exactly one of shapes and path
        train_data = Path(_path(base, exp.data.path))
        stages.append(Stage("data", [], inputs=[train_data]))
        evaluator = None  # trained on the cache, after precompute
    if exp.vae.path is None:
        vae_dir = folder["vae"] / "model"
        cmd = make(vae.TrainSettings, {"data": str(train_data), "out": str(vae_dir)}, "vae",
                   keys={"data": "data.path"}, user=exp.vae.args, user_where="vae.args")  # fmt: skip
        stages.append(Stage("vae", [cmd], depends=["data"]))
    else:
        vae_dir = Path(_path(base, exp.vae.path))
        stages.append(Stage("vae", [], inputs=[vae_dir / "config.json"]))
    cache = folder["precompute"] / "cache"
    cmd = make(precompute.Settings, {"data": str(train_data), "vae": str(vae_dir), "out": str(cache),
               "text_encoder": _relative(base, exp.precompute.text_encoder)}, "precompute",
               keys={"data": "data.path", "vae": "vae.path"}, user=exp.precompute.args, user_where="precompute.args")  # fmt: skip
    stages.append(Stage("precompute", [cmd], depends=["data", "vae"]))
    if exp.data.path is not None and not given:  # the evaluator of any captioned data: on the cache
        evaluates = not exp.skipped("evaluate") or (exp.variants is not None and not exp.skipped("variants"))
        evaluator = str(folder["evaluator"] / "evaluator")
        values: dict[str, Any] = {"out": evaluator, "cache": str(cache)}
        if "val_items" not in exp.data.evaluator:  # hold out what training holds out: the prompts evaluated
            values["val_items"] = _held_out(exp, base)
        cmd = make(data.EvaluatorSettings, {k: v for k, v in values.items() if v is not None}, "data.evaluator",
                   user=exp.data.evaluator, user_where="data.evaluator")  # fmt: skip
        skip = "" if evaluates else _skip(exp, "evaluate")  # nothing would read it
        stages.append(Stage("evaluator", [cmd], depends=["precompute"], skip=skip))
    space = Path(_path(base, exp.search.space))
    teacher = _teacher_stage(exp, exp_path, folder["teacher"], cache, space, make, stages)
    se = exp.search
    cmd = make(search.Settings, {"space": str(space), "study": exp.name, "trials": se.trials, "cache": str(cache),
               "sampler": se.sampler, "backend": se.backend, "workers": se.workers, "seed": se.seed,
               "results": str(folder["search"]), "teacher": teacher}, "search",
               keys={"teacher": "teacher"})  # fmt: skip
    stages.append(
        Stage("search", [cmd], inputs=[space], depends=["precompute"] + (["teacher"] if teacher else []))
    )
    cmd = make(export.Settings, {"study": exp.name, "results": str(folder["search"]), "pick": exp.export.pick,
               "out": str(folder["export"])}, "export")  # fmt: skip
    stages.append(Stage("export", [cmd], depends=["search"]))
    run = folder["train"] / "run"
    config = _relative(base, exp.train.config)
    overrides = exp.train.set + _distill_overrides(exp, exp_path, teacher)
    cmd = make(train.Settings, {"config": config, "arch": str(folder["export"] / "arch.yaml"), "cache": str(cache),
               "out": str(run), "max_steps": exp.train.max_steps, "overrides": overrides}, "train",
               keys={"overrides": "train.set"})  # fmt: skip
    stages.append(Stage("train", [cmd], inputs=[Path(config)] if Path(config).is_file() else [],
                        depends=["export", "precompute"] + (["teacher"] if exp.train.distill else [])))  # fmt: skip
    sp = exp.sample
    cmd = make(sample.Settings, {"run": str(run), "out": str(folder["sample"] / "images"), "steps": sp.steps,
               "guidance": sp.guidance, "n": sp.n, "seed": sp.seed, "prompt": sp.prompts or None}, "sample",
               keys={"prompt": "sample.prompts"})  # fmt: skip
    stages.append(Stage("sample", [cmd], depends=["train"], skip=_skip(exp, "sample")))
    evaluator = given or evaluator
    made_by = (
        [] if given else ["data" if exp.data.shapes is not None else "evaluator"]
    )  # the stage training it
    cmd = make(eval.Settings, {"run": str(run), "steps": exp.evaluate.steps, "n": exp.evaluate.n,
               "out": str(folder["evaluate"] / "eval"), "evaluator": evaluator}, "evaluate",
               user=exp.evaluate.args, user_where="evaluate.args")  # fmt: skip
    stages.append(Stage("evaluate", [cmd], inputs=[Path(given)] if given else [], depends=["train", *made_by],
                        skip=_skip(exp, "evaluate")))  # fmt: skip
    if exp.few_step is not None:
        stages.append(_few_step_stage(exp, exp_path, folder["few_step"], cache, str(run), teacher, evaluator,
                                      made_by, given, make))  # fmt: skip
    if exp.variants is not None:
        resolve = {"arch": lambda v: _path(base, v), "config": lambda v: _relative(base, v)}
        jobs = plan_variants(
            exp.variants, exp, resolve, root, cache, Path(evaluator) if evaluator else None, make
        )
        files = [Path(_relative(base, p)) for v in exp.variants.runs for p in (v.arch, v.config)
                 if p and p != SEARCHED and Path(_relative(base, p)).is_file()]  # fmt: skip
        stages.append(Stage("variants", [c for cmds in jobs.values() for c in cmds], inputs=files + (
            [Path(given)] if given else []), depends=["precompute", "export", "train", "evaluate"],
            jobs=jobs, skip=_skip(exp, "variants")))  # fmt: skip
    cmd = make(report.Settings, {"study": exp.name, "results": str(folder["search"]), "out": str(folder["report"])},
               "report")  # fmt: skip
    stages.append(Stage("report", [cmd], depends=["search", "export", "train", "sample", "evaluate"],
                        skip=_skip(exp, "report")))  # fmt: skip
    planned = {stage.name for stage in stages if not stage.skip}
    for stage in stages:  # a skipped stage is no one's input (_check_skips: none is needed)
        stage.depends = [d for d in stage.depends if d in planned]
    for stage in stages:  # every file a stage reads must be usable now, not hours later
        for settings in [] if stage.skip else stage.commands:
            keys: dict[str, str] = make.keys[id(settings)]

            def where(field: str, keys: dict[str, str] = keys) -> str:
                return f"{exp_path}: {keys[field]}"

            check_inputs(settings, root, where)
            if isinstance(settings, eval.Settings):
                check_evaluation(settings, root, where)
            if isinstance(
                settings, data.EvaluatorSettings
            ):  # its flags' combination, e.g. --size with --cache
                try:
                    data.dry_run(settings)
                except NasError as exc:
                    raise NasError(f"{exp_path}: data.evaluator: {exc}") from None
    return stages


def _few_step_stage(exp: Experiment, exp_path: Path, folder: Path, cache: Path, run: str, teacher: str | None,
                    evaluator: str | None, made_by: list[str], given: str | None, make: _Builder) -> Stage:  # fmt: skip
    """The few_step stage: its teacher is the train stage's run or the teacher stage's U-Net; its
    evaluation (if any) reads the evaluator the evaluate stage reads."""
    fs = exp.few_step
    assert fs is not None  # plan() adds the stage only with a few_step: section
    skip = _skip(exp, "few_step")
    if skip:
        return Stage("few_step", [], skip=skip)
    source = teacher if fs.teacher == "teacher" else run
    assert source is not None  # check_few_step: teacher: teacher needs a teacher: section
    commands = plan_few_step(exp, exp_path.parent, folder, cache, source, evaluator, make, _relative)
    config = Path(_relative(exp_path.parent, fs.config or exp.train.config))
    inputs = ([config] if config.is_file() else []) + ([Path(given)] if given and fs.steps else [])
    depends = ["export", "precompute", "teacher" if fs.teacher == "teacher" else "train"]
    return Stage("few_step", commands, inputs=inputs, depends=depends + (made_by if fs.steps else []))


def _shapes_evaluator_size() -> int:
    from nas.evaluate.shapes_evaluator import EvaluatorConfig

    return int(EvaluatorConfig.model_fields["resolution"].default)


def _held_out(exp: Experiment, base: Path) -> int | None:
    """The train stage's `val_items`: the cache's last items, never trained on, whose captions the
    evaluate stage prompts with (None if the config does not load: its own check reports it)."""
    from nas.train.config import load_config

    try:
        config = load_config(_relative(base, exp.train.config), exp.train.set, max_steps=exp.train.max_steps)
    except NasError:
        return None
    return int(config.val_items)


def _skip(exp: Experiment, name: str) -> str:
    """Why a stage is left out ('' if it runs), as the experiment file says it."""
    return f"{name}: {{skip: true}}" if exp.skipped(name) else ""


def _check_skips(exp: Experiment, exp_path: Path) -> None:
    """A skipped stage may not be one that a running stage reads: the variants' comparison reads
    the main run's evaluation (the sample grid and the search report nothing reads)."""
    if exp.variants is not None and not exp.skipped("variants") and exp.skipped("evaluate"):
        raise NasError(f"{exp_path}: evaluate.skip: the variants stage compares against the main run's "
                       "evaluation; skip variants too (variants: {skip: true}) or run evaluate")  # fmt: skip


def _teacher_stage(exp: Experiment, exp_path: Path, folder: Path, cache: Path, space: Path, make: _Builder,
                   stages: list[Stage]) -> str | None:  # fmt: skip
    """Add the teacher stage (if the experiment has one); the teacher folder the search reads."""
    from nas.commands import train

    t, base = exp.teacher, exp_path.parent
    if t is None:
        return None
    if t.path is not None:  # its listing (names, sizes, times) is the stage's input: a new teacher reruns
        path = Path(_path(base, t.path))
        stages.append(Stage("teacher", [], inputs=[path]))
        return str(path)
    assert t.train is not None  # TeacherStage's validator: exactly one of path and train
    run, arch = folder / "run", _path(base, t.train.arch)
    config = _relative(base, t.train.config)
    cmd = make(train.Settings, {"config": config, "arch": arch, "cache": str(cache), "out": str(run),
               "max_steps": t.train.max_steps, "overrides": t.train.set}, "teacher.train",
               keys={"overrides": "teacher.train.set"})  # fmt: skip
    inputs = [Path(p) for p in (config, arch) if Path(p).is_file()]
    stages.append(Stage("teacher", [cmd], inputs=inputs, depends=["precompute"]))
    _check_teacher_arch(exp_path, arch, space)
    return str(run)


def _check_teacher_arch(exp_path: Path, arch: str, space: Path) -> None:
    """A teacher still to be trained: its architecture must seed every point of the space (the
    search checks the trained folder again before its first trial)."""
    from nas.search.teacher import check_space_teacher
    from nas.space import load_arch, load_space

    if not Path(arch).is_file() or not space.is_file():
        return  # reported by the file checks of the stages that read them
    loaded = load_space(space)
    init = loaded.proxy.distill.init if loaded.proxy.distill is not None else "inherit"
    try:
        check_space_teacher(loaded, load_arch(arch), init)
    except NasError as exc:
        raise NasError(f"{exp_path}: teacher.train.arch: {exc}") from None


def _distill_overrides(exp: Experiment, exp_path: Path, teacher: str | None) -> list[str]:
    """`train.distill` as `--set distill.KEY=VALUE` overrides, the teacher from the teacher stage."""
    d = exp.train.distill
    if d is None:
        return []
    if teacher is None:
        raise NasError(f"{exp_path}: train.distill: needs a teacher: section (path or train)")
    if "teacher" in d:
        raise NasError(f"{exp_path}: train.distill.teacher: set by nas run from the teacher: section")
    return [f"distill.teacher={teacher}"] + [f"distill.{k}={v}" for k, v in d.items()]


def _digest(path: Path) -> str:
    """A stage input's content: a YAML file by its parsed data (editing a comment or the layout
    redoes nothing), any other file by its bytes, a folder by its listing."""
    h = hashlib.sha256()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            data = read_yaml(path)
        except (NasError, UnicodeDecodeError):
            data = path.read_bytes().hex()  # the command that reads it will report the error
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
    elif path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():  # a user's data folder: names, sizes and times, not contents
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(b"missing")
    return h.hexdigest()


def _hashed_section(exp: Experiment, name: str) -> Any:
    """The part of the experiment file a stage's fingerprint hashes: its section less NOT_HASHED
    (and, for a folder dataset, less `data.evaluator`, the evaluator stage's); none if empty."""
    section = getattr(exp, name, None)
    if section is None:
        return None
    exclude = set(NOT_HASHED.get(name, ()))
    if name == "data" and exp.data.path is not None:
        exclude.add("evaluator")
    return section.model_dump(mode="json", exclude=exclude) or None


def fingerprint(stages: list[Stage], exp: Experiment) -> None:
    done: dict[str, str] = {}
    for stage in stages:
        if stage.skip:
            continue
        commands = [to_argv(s) for s in stage.commands]  # the resolved settings, defaults left out
        h = hashlib.sha256(json.dumps([stage.name, commands], sort_keys=True).encode())
        h.update(json.dumps(_hashed_section(exp, stage.name), sort_keys=True).encode())
        for path in stage.inputs:
            h.update(_digest(path).encode())
        for dep in stage.depends:
            h.update(done[dep].encode())
        stage.fingerprint = done[stage.name] = h.hexdigest()[:16]
