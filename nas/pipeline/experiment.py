"""The experiment file of `nas run`: one strict pydantic model per section (docs/pipeline.md
lists every key). Paths are relative to the experiment file; `args:` maps and `data.evaluator`
are extra flags of the stage's `nas` command, checked against that command's settings.

Stages after `train` (sample, evaluate, few_step, variants, report) can be left out with `skip: true`;
every stage up to `train` makes the model and cannot be. `few_step` and `variants` run only when
the file has their section."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from nas.commands.search import Backend
from nas.core import limits as L
from nas.core.config import Strict
from nas.pipeline.few_step import FewStepStage
from nas.pipeline.variants import VariantsStage
from nas.search.settings import MAX_TRIALS, MAX_WORKERS, SamplerName

StageName = Literal[
    "data",
    "vae",
    "precompute",
    "evaluator",  # only for a folder dataset (`data.path`); shapes train theirs in `data`
    "teacher",
    "search",
    "export",
    "train",
    "sample",
    "evaluate",
    "few_step",  # only with a few_step: section (a consistency-distilled student, nas/pipeline/few_step.py)
    "variants",
    "report",
]
STAGES: tuple[str, ...] = typing.get_args(StageName)  # in order; `nas run --from` choices
# `skip: true`; the others make the model
SKIPPABLE = ("sample", "evaluate", "few_step", "variants", "report")
# Section keys left out of the stage fingerprints, so that files without them keep theirs: `skip`
# (a skipped stage has no fingerprint), evaluate.evaluator and evaluate.args (hashed through the
# command's flags, and the evaluator folder's listing).
NOT_HASHED = {
    "sample": {"skip"},
    "evaluate": {"skip", "evaluator", "args"},
    "few_step": {"skip"},
    "variants": {"skip"},
    "report": {"skip"},
}


class ShapesData(Strict):
    # Upper bounds: nas/core/limits.py
    n: int = Field(2000, ge=10, le=L.MAX_DATA_ITEMS)  # images (train + validation)
    size: int = Field(32, ge=8, le=L.MAX_IMAGE_SIZE)  # pixels, square
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class DataStage(Strict):
    shapes: ShapesData | None = None  # the embedded dataset (and its evaluator) ...
    path: str | None = None  # ... or an image folder with metadata.jsonl / tar shards
    # extra `nas data train-evaluator` settings, e.g. {steps: 1500}; for a folder the evaluator
    # is trained on the latent cache by the `evaluator` stage, for shapes in the `data` stage
    evaluator: dict[str, Any] = {}

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
    skip: bool = False  # true: no sample grid (nothing else reads it)
    prompts: list[str] = []  # default: captions held out of training
    steps: int = Field(30, ge=1, le=L.MAX_SAMPLE_STEPS)
    guidance: float = Field(4.0, ge=1, le=L.MAX_GUIDANCE)  # classifier-free guidance scale; 1 = none
    n: int = Field(1, ge=1, le=L.MAX_IMAGES)  # images per prompt
    seed: int = Field(0, ge=0, le=L.MAX_SEED)


class EvaluateStage(Strict):
    skip: bool = False  # true: no quality figures (then no evaluator is trained for a folder)
    steps: list[Annotated[int, Field(ge=1, le=L.MAX_SAMPLE_STEPS)]] = Field([10, 20, 30, 50], max_length=100)
    n: int = Field(100, ge=2, le=L.MAX_IMAGES)  # images per step count
    # an evaluator folder made before (`nas data train-evaluator`; evaluator.json inside), relative to
    # the experiment file; null: the one this experiment trains (data or evaluator stage)
    evaluator: str | None = None
    # extra `nas eval` settings (variants' evaluations too), e.g. {clip: /models/clip-vit-b32, k: 8}
    args: dict[str, Any] = {}


class ReportStage(Strict):
    skip: bool = False  # true: no search report (pareto.png, summary.md); summary.json is still written


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
    few_step: FewStepStage | None = None  # null: no few-step student
    variants: VariantsStage | None = None  # more runs beside the main one, and their comparison
    report: ReportStage = ReportStage()

    @field_validator("data", "vae", "precompute", "teacher", "search", "export", "train", mode="before")
    @classmethod
    def _not_skippable(cls, value: Any, info) -> Any:
        if isinstance(value, dict) and "skip" in value:
            raise ValueError(
                f"{info.field_name} cannot be skipped: every stage up to train makes the model "
                f"(skip: true is for {', '.join(SKIPPABLE)})"
            )
        return value

    @field_validator("sample", "evaluate", "report", mode="before")
    @classmethod
    def _no_null(cls, value: Any, info) -> Any:
        if value is None:
            raise ValueError(
                f"null is not a setting; to leave the stage out write `{info.field_name}: {{skip: true}}`"
            )
        return value

    def skipped(self, stage: str) -> bool:
        """Whether the experiment leaves this stage out (`skip: true`)."""
        section = getattr(self, stage, None) if stage in SKIPPABLE else None
        return bool(section is not None and section.skip)
