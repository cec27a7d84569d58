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
interrupted (precompute, search and train continue from what they saved; the others start over).
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from nas.commands.search import Backend
from nas.core import limits as L
from nas.core.config import Strict, read_yaml
from nas.core.errors import NasError
from nas.core.settings import CommandSettings, build, to_argv
from nas.pipeline.check import check_inputs
from nas.pipeline.variants import SEARCHED, VariantsStage, plan_variants
from nas.search.settings import MAX_TRIALS, MAX_WORKERS, SamplerName

StageName = Literal[
    "data",
    "vae",
    "precompute",
    "teacher",
    "search",
    "export",
    "train",
    "sample",
    "evaluate",
    "variants",
    "report",
]
STAGES: tuple[str, ...] = typing.get_args(StageName)  # in order; `nas run --from` choices
RESUMABLE = {"precompute", "teacher", "search", "train", "variants"}  # rerun the same command to continue


class ShapesData(Strict):
    # Upper bounds: nas/core/limits.py
    n: int = Field(2000, ge=10, le=L.MAX_DATA_ITEMS)  # images (train + validation)
    size: int = Field(32, ge=8, le=L.MAX_IMAGE_SIZE)  # pixels, square
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class DataStage(Strict):
    shapes: ShapesData | None = None  # the embedded dataset (and its evaluator) ...
    path: str | None = None  # ... or an image folder with metadata.jsonl / tar shards
    evaluator: dict[str, Any] = {}  # extra `nas data train-evaluator` settings, e.g. {steps: 1500}

    @model_validator(mode="after")
    def _one(self) -> DataStage:
        if (self.shapes is None) == (self.path is None):
            raise ValueError("give exactly one of shapes or path")
        return self


class VaeStage(Strict):
    path: str | None = None  # a diffusers AutoencoderKL folder; null: train one (`nas vae train`)
    args: dict[str, Any] = {}  # extra `nas vae train` settings, e.g. {steps: 1500}


class PrecomputeStage(Strict):
    text_encoder: str = "minilm"  # bundled MiniLM, or a transformers folder
    args: dict[str, Any] = {}  # extra `nas precompute` settings, e.g. {batch: 32}


class TeacherTrain(Strict):
    """Train the teacher first, as `nas train` would (paths relative to the experiment file)."""

    arch: str  # architecture YAML of the teacher, e.g. ../search_spaces/archs/quickstart_baseline.yaml
    config: str = "tiny"  # preset name or train config YAML
    max_steps: int | None = Field(None, ge=1, le=L.MAX_STEPS)
    set: list[str] = []  # `--set` overrides


class TeacherStage(Strict):
    """The U-Net the search's proxy runs (and, with `train.distill`, the final training) inherit
    from and distil from: a trained folder (`path`) or one trained by this stage (`train`)."""

    path: str | None = None  # a `nas train` run, a diffusers U-Net or a pipeline folder
    train: TeacherTrain | None = None

    @model_validator(mode="after")
    def _one(self) -> TeacherStage:
        if (self.path is None) == (self.train is None):
            raise ValueError("give exactly one of path or train")
        return self


class SearchStage(Strict):
    space: str  # search-space YAML, relative to the experiment file
    trials: int = Field(30, ge=1, le=MAX_TRIALS)  # as `nas search` (see nas/search/settings.py)
    sampler: SamplerName = "gp"  # as `nas search` (see nas/search/settings.py)
    backend: Backend = "optuna"
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class ExportStage(Strict):
    pick: str = "knee"  # best | knee | "latency_ms<=12"


class TrainStage(Strict):
    config: str = "tiny"  # preset name or train config YAML (relative to the experiment file)
    max_steps: int | None = Field(None, ge=1, le=L.MAX_STEPS)
    set: list[str] = []  # `--set` overrides, e.g. ["lr=2e-3"]
    # distil from the experiment's teacher: `distill:` weights of a training config without
    # `teacher` (nas run sets it), e.g. {output: 1.0, feature: 1.0}; null: no distillation
    distill: dict[str, Any] | None = None


class SampleStage(Strict):
    prompts: list[str] = []  # default: captions held out of training
    steps: int = Field(30, ge=1, le=L.MAX_SAMPLE_STEPS)
    guidance: float = Field(4.0, ge=1, le=L.MAX_GUIDANCE)  # classifier-free guidance scale; 1 = none
    n: int = Field(1, ge=1, le=L.MAX_IMAGES)  # images per prompt
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class EvaluateStage(Strict):
    steps: list[Annotated[int, Field(ge=1, le=L.MAX_SAMPLE_STEPS)]] = Field([10, 20, 30, 50], max_length=100)
    n: int = Field(100, ge=2, le=L.MAX_IMAGES)  # images per step count


class Experiment(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # folder RESULTS/<name>/ and the study's name
    description: str = ""
    data: DataStage
    vae: VaeStage = VaeStage()
    precompute: PrecomputeStage = PrecomputeStage()
    teacher: TeacherStage | None = None  # null: the search's proxy runs without a teacher
    search: SearchStage
    export: ExportStage = ExportStage()
    train: TrainStage = TrainStage()
    sample: SampleStage = SampleStage()
    evaluate: EvaluateStage = EvaluateStage()
    variants: VariantsStage | None = None  # more runs beside the main one, and their comparison


@dataclass
class Stage:
    name: str
    commands: list[CommandSettings]  # `nas` commands, run in order (shown as their command lines)
    inputs: list[Path] = field(default_factory=list)  # files whose content the stage reads
    depends: list[str] = field(default_factory=list)
    fingerprint: str = ""
    jobs: dict[str, list[CommandSettings]] = field(default_factory=dict)  # variants: per variant


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
    if exp.data.shapes is not None:
        shapes_dir = folder["data"] / "shapes"
        s = exp.data.shapes
        evaluator = folder["data"] / "evaluator"
        stages.append(Stage("data", [
            make(data.ShapesSettings, {"out": str(shapes_dir), "n": s.n, "size": s.size, "seed": s.seed}, "data.shapes"),
            make(data.EvaluatorSettings, {"out": str(evaluator), "data": str(shapes_dir), "size": s.size}, "data",
                 user=exp.data.evaluator, user_where="data.evaluator"),
        ]))  # fmt: skip
        train_data = shapes_dir / "train"
    else:
        assert exp.data.path is not None  # DataStage's validator: exactly one of shapes and path
        train_data = Path(_path(base, exp.data.path))
        stages.append(Stage("data", [], inputs=[train_data]))
        evaluator = None
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
    stages.append(Stage("sample", [cmd], depends=["train"]))
    cmd = make(eval.Settings, {"run": str(run), "steps": exp.evaluate.steps, "n": exp.evaluate.n,
               "out": str(folder["evaluate"] / "eval"), "evaluator": evaluator and str(evaluator)}, "evaluate")  # fmt: skip
    stages.append(Stage("evaluate", [cmd], depends=["train", "data"]))
    if exp.variants is not None:
        resolve = {"arch": lambda v: _path(base, v), "config": lambda v: _relative(base, v)}
        jobs = plan_variants(exp.variants, exp, resolve, root, cache, evaluator, make)
        files = [Path(_relative(base, p)) for v in exp.variants.runs for p in (v.arch, v.config)
                 if p and p != SEARCHED and Path(_relative(base, p)).is_file()]  # fmt: skip
        stages.append(Stage("variants", [c for cmds in jobs.values() for c in cmds], inputs=files,
                            depends=["precompute", "export", "train", "evaluate"], jobs=jobs))  # fmt: skip
    cmd = make(report.Settings, {"study": exp.name, "results": str(folder["search"]), "out": str(folder["report"])},
               "report")  # fmt: skip
    stages.append(Stage("report", [cmd], depends=["search", "export", "train", "sample", "evaluate"]))
    for stage in stages:  # every file a stage reads must be usable now, not hours later
        for settings in stage.commands:
            keys: dict[str, str] = make.keys[id(settings)]

            def where(field: str, keys: dict[str, str] = keys) -> str:
                return f"{exp_path}: {keys[field]}"

            check_inputs(settings, root, where)
    return stages


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


def fingerprint(stages: list[Stage], exp: Experiment) -> None:
    done: dict[str, str] = {}
    for stage in stages:
        commands = [to_argv(s) for s in stage.commands]  # the resolved settings, defaults left out
        h = hashlib.sha256(json.dumps([stage.name, commands], sort_keys=True).encode())
        h.update(
            json.dumps(
                getattr(exp, stage.name).model_dump(mode="json") if hasattr(exp, stage.name) else None,
                sort_keys=True,
            ).encode()
        )
        for path in stage.inputs:
            h.update(_digest(path).encode())
        for dep in stage.depends:
            h.update(done[dep].encode())
        stage.fingerprint = done[stage.name] = h.hexdigest()[:16]
