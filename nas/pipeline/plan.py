"""`nas run EXPERIMENT.yaml`: the stages of an experiment, in order, each in
results/<experiment>/<stage>/ with its resolved config and a `stage.json` (fingerprint, done,
seconds, command).

A stage is the `nas` command a user would type (built from the experiment file and the folders of
the stages before it), so `nas run` does exactly what the documented commands do. Its fingerprint
hashes that command, the content of the files it reads (space, train config, prompts) and the
fingerprints of the stages it depends on: a rerun skips a stage whose fingerprint is unchanged and
finished, redoes one whose inputs changed (and everything after it), and resumes one that was
interrupted (precompute, search and train continue from what they saved; the others start over).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, model_validator

from nas import limits as L
from nas.config import Strict, read_yaml
from nas.errors import NasError
from nas.pipeline.variants import SEARCHED, VariantsStage, plan_variants

STAGES = (
    "data",
    "vae",
    "precompute",
    "search",
    "export",
    "train",
    "sample",
    "evaluate",
    "variants",
    "report",
)
RESUMABLE = {"precompute", "search", "train", "variants"}  # rerun the same command to continue


class ShapesData(Strict):
    # Upper bounds: nas/limits.py
    n: int = Field(2000, ge=10, le=L.MAX_DATA_ITEMS)  # images (train + validation)
    size: int = Field(32, ge=8, le=L.MAX_IMAGE_SIZE)  # pixels, square
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class DataStage(Strict):
    shapes: ShapesData | None = None  # the embedded dataset (and its evaluator) ...
    path: str | None = None  # ... or an image folder with metadata.jsonl / tar shards
    evaluator: dict[str, Any] = {}  # extra `nas data train-evaluator` flags, e.g. {steps: 1500}

    @model_validator(mode="after")
    def _one(self) -> DataStage:
        if (self.shapes is None) == (self.path is None):
            raise ValueError("give exactly one of shapes or path")
        return self


class VaeStage(Strict):
    path: str | None = None  # a diffusers AutoencoderKL folder; null: train one (`nas vae train`)
    args: dict[str, Any] = {}  # extra `nas vae train` flags, e.g. {steps: 1500}


class PrecomputeStage(Strict):
    text_encoder: str = "minilm"  # bundled MiniLM, or a transformers folder
    args: dict[str, Any] = {}  # extra `nas precompute` flags


class SearchStage(Strict):
    space: str  # search-space YAML, relative to the experiment file
    trials: int = Field(12, ge=1, le=L.MAX_TRIALS)
    sampler: str = "tpe"
    backend: str = "optuna"
    workers: int = Field(1, ge=1, le=L.MAX_WORKERS)
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class ExportStage(Strict):
    pick: str = "knee"  # best | knee | "latency_ms<=12"


class TrainStage(Strict):
    config: str = "tiny"  # preset name or train config YAML (relative to the experiment file)
    max_steps: int | None = Field(None, ge=1, le=L.MAX_STEPS)
    set: list[str] = []  # `--set` overrides, e.g. ["lr=2e-3"]


class SampleStage(Strict):
    prompts: list[str] = []  # default: captions held out of training
    steps: int = Field(30, ge=1, le=L.MAX_SAMPLE_STEPS)
    guidance: float = Field(4.0, ge=1, le=L.MAX_GUIDANCE)  # 1 = no classifier-free guidance
    n: int = Field(1, ge=1, le=L.MAX_IMAGES)  # images per prompt
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class EvaluateStage(Strict):
    steps: list[Annotated[int, Field(ge=1, le=L.MAX_SAMPLE_STEPS)]] = Field([10, 20, 30, 50], max_length=100)
    n: int = Field(100, ge=2, le=L.MAX_IMAGES)  # images per step count


class Experiment(Strict):
    name: str
    description: str = ""
    data: DataStage
    vae: VaeStage = VaeStage()
    precompute: PrecomputeStage = PrecomputeStage()
    search: SearchStage
    export: ExportStage = ExportStage()
    train: TrainStage = TrainStage()
    sample: SampleStage = SampleStage()
    evaluate: EvaluateStage = EvaluateStage()
    variants: VariantsStage | None = None  # more runs beside the main one, and their comparison


@dataclass
class Stage:
    name: str
    commands: list[list[str]]  # `nas` argv lists, run in order
    inputs: list[Path] = field(default_factory=list)  # files whose content the stage reads
    depends: list[str] = field(default_factory=list)
    fingerprint: str = ""
    jobs: dict[str, list[list[str]]] = field(default_factory=dict)  # variants: commands per variant


def _flags(args: dict[str, Any]) -> list[str]:
    out = []
    for key, value in args.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def _relative(base: Path, value: str) -> str:
    path = Path(value)
    if path.is_absolute() or not (base / path).exists():
        return value  # a preset name, or an absolute path
    return os.path.normpath(base / path)


def plan(exp: Experiment, exp_path: Path, results: Path) -> list[Stage]:
    """The stages with their commands, folders and dependencies (nothing is run)."""
    base = exp_path.parent
    root = results / exp.name
    folder = {name: root / name for name in STAGES}
    stages: list[Stage] = []
    if exp.data.shapes is not None:
        shapes_dir = folder["data"] / "shapes"
        s = exp.data.shapes
        stages.append(Stage("data", [
            ["data", "shapes", "--out", str(shapes_dir), "--n", str(s.n), "--size", str(s.size), "--seed", str(s.seed)],
            ["data", "train-evaluator", "--out", str(folder["data"] / "evaluator"), "--data", str(shapes_dir),
             "--size", str(s.size), *_flags(exp.data.evaluator)],
        ]))  # fmt: skip
        train_data = shapes_dir / "train"
        evaluator = folder["data"] / "evaluator"
    else:
        assert exp.data.path is not None  # DataStage's validator: exactly one of shapes and path
        train_data = Path(_relative(base, exp.data.path))
        stages.append(Stage("data", [], inputs=[train_data]))
        evaluator = None
    if exp.vae.path is None:
        vae = folder["vae"] / "model"
        stages.append(
            Stage(
                "vae",
                [["vae", "train", "--data", str(train_data), "--out", str(vae), *_flags(exp.vae.args)]],
                depends=["data"],
            )
        )
    else:
        vae = Path(_relative(base, exp.vae.path))
        stages.append(Stage("vae", [], inputs=[vae / "config.json"]))
    cache = folder["precompute"] / "cache"
    text_encoder = _relative(base, exp.precompute.text_encoder)
    stages.append(Stage("precompute", [["precompute", "--data", str(train_data), "--vae", str(vae), "--text-encoder", text_encoder,
                                        "--out", str(cache), *_flags(exp.precompute.args)]], depends=["data", "vae"]))  # fmt: skip
    space = Path(_relative(base, exp.search.space))
    se = exp.search
    stages.append(Stage("search", [["search", str(space), "--study", exp.name, "--trials", str(se.trials), "--cache", str(cache),
                                    "--sampler", se.sampler, "--backend", se.backend, "--workers", str(se.workers),
                                    "--seed", str(se.seed), "--results", str(folder["search"])]],
                        inputs=[space], depends=["precompute"]))  # fmt: skip
    stages.append(Stage("export", [["export", "--study", exp.name, "--results", str(folder["search"]), "--pick", exp.export.pick,
                                    "--out", str(folder["export"])]], depends=["search"]))  # fmt: skip
    run = folder["train"] / "run"
    config = _relative(base, exp.train.config)
    train_cmd = [
        "train",
        config,
        "--arch",
        str(folder["export"] / "arch.yaml"),
        "--cache",
        str(cache),
        "--out",
        str(run),
    ]
    if exp.train.max_steps:
        train_cmd += ["--max-steps", str(exp.train.max_steps)]
    if exp.train.set:
        train_cmd += ["--set", *exp.train.set]
    stages.append(
        Stage(
            "train",
            [train_cmd],
            inputs=[Path(config)] if Path(config).is_file() else [],
            depends=["export", "precompute"],
        )
    )
    sp = exp.sample
    sample_cmd = ["sample", str(run), "--out", str(folder["sample"] / "images"), "--steps", str(sp.steps), "--guidance", str(sp.guidance),
                  "--n", str(sp.n), "--seed", str(sp.seed)]  # fmt: skip
    if sp.prompts:
        sample_cmd += ["--prompt", *sp.prompts]
    stages.append(Stage("sample", [sample_cmd], depends=["train"]))
    eval_cmd = ["eval", str(run), "--steps", ",".join(map(str, exp.evaluate.steps)), "--n", str(exp.evaluate.n),
                "--out", str(folder["evaluate"] / "eval")]  # fmt: skip
    if evaluator is not None:
        eval_cmd += ["--evaluator", str(evaluator)]
    stages.append(Stage("evaluate", [eval_cmd], depends=["train", "data"]))
    if exp.variants is not None:
        jobs = plan_variants(exp.variants, exp, lambda v: _relative(base, v), root, cache, evaluator)
        files = [Path(_relative(base, p)) for v in exp.variants.runs for p in (v.arch, v.config)
                 if p and p != SEARCHED and Path(_relative(base, p)).is_file()]  # fmt: skip
        stages.append(Stage("variants", [c for cmds in jobs.values() for c in cmds], inputs=files,
                            depends=["precompute", "export", "train", "evaluate"], jobs=jobs))  # fmt: skip
    stages.append(Stage("report", [["report", "--study", exp.name, "--results", str(folder["search"]), "--out", str(folder["report"])]],
                        depends=["search", "export", "train", "sample", "evaluate"]))  # fmt: skip
    for stage in stages:  # every command must parse now, not hours later
        for argv in stage.commands:
            parse(argv, f"{exp_path}: {stage.name}")
    return stages


def parse(argv: list[str], where: str):
    """argparse Namespace for a `nas` argv; a flag the command rejects is a one-line NasError."""
    from nas.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        last = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "invalid arguments"
        raise NasError(f"{where}: {last}") from None


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
        h = hashlib.sha256(json.dumps([stage.name, stage.commands], sort_keys=True).encode())
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
