"""Whole-plan checks of `nas run`, before the first stage runs (and in --dry-run): every file or
folder a stage reads that no earlier stage writes exists, and the files parse and validate (space
with its baselines and proxy recipe, architectures, training configs with their `--set`
overrides). A failure is one line naming the experiment file and the key; nothing is written.

Which fields are inputs, and of what kind, is declared on the command settings (`arg(input=KIND)`,
nas/core/settings.py); this module holds one checker per kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nas.core.errors import NasError
from nas.core.settings import CommandSettings, input_fields

if TYPE_CHECKING:  # the schema only; experiment.py does not import this module
    from nas.pipeline.experiment import Experiment


def _file(value: str, settings: CommandSettings) -> None:
    if not Path(value).is_file():
        raise NasError(f"{value}: file not found")


def _folder(value: str, settings: CommandSettings) -> None:
    if not Path(value).is_dir():
        raise NasError(f"{value}: folder not found")


def _data(value: str, settings: CommandSettings) -> None:
    if "{" in value:  # a shard pattern ('shards/{00000..00009}.tar'): the reader expands it
        return
    if not Path(value).exists():
        raise NasError(f"{value}: not found (an image folder with metadata.jsonl, or .tar shards)")


def _vae(value: str, settings: CommandSettings) -> None:
    folder = Path(value)
    if not ((folder / "config.json").is_file() or (folder / "vae" / "config.json").is_file()):
        raise NasError(f"{value}: not a diffusers AutoencoderKL folder (no config.json, nor vae/config.json)")


def _text_encoder(value: str, settings: CommandSettings) -> None:
    if value != "minilm" and not Path(value).is_dir():
        raise NasError(f"{value}: not 'minilm' and no such transformers folder")


def _space(value: str, settings: CommandSettings) -> None:
    from nas.search.objective import proxy_config
    from nas.search.teacher import prepare_distill
    from nas.space import load_arch, load_space
    from nas.space.sample import arch_to_params

    space = load_space(value)
    for rel in space.baselines:  # resolved as the search resolves them
        path = Path(value).parent / rel
        arch_to_params(space, load_arch(path), str(path))
    # a --teacher not there yet is written by an earlier stage (nas/pipeline/plan.py checks its
    # arch against the space) or reported missing by its own `folder` check
    teacher = getattr(settings, "teacher", None)
    space = prepare_distill(space, value, teacher if teacher and Path(teacher).exists() else None)
    proxy_config(space, value)


def _arch(value: str, settings: CommandSettings) -> None:
    from nas.space import load_arch

    load_arch(value)


def _train_config(value: str, settings: CommandSettings) -> None:
    from nas.train.config import load_config

    load_config(value, settings.overrides, max_steps=settings.max_steps)  # type: ignore[attr-defined]


EVALUATOR_FILE = "evaluator.json"  # what `nas data train-evaluator` writes beside its weights
LOCAL_WEIGHTS = ("fid_weights", "clip")  # `nas eval` settings naming local weights (if it has them)

# input kind (nas.core.settings.arg(input=...)) -> checker(value, settings); NasError if unusable
CHECKS: dict[str, Callable[[str, CommandSettings], None]] = {
    "file": _file,
    "folder": _folder,
    "data": _data,
    "vae": _vae,
    "text_encoder": _text_encoder,
    "space": _space,
    "arch": _arch,
    "train_config": _train_config,
}


def check_evaluation(settings: CommandSettings, produced: Path, where: Callable[[str], str]) -> None:
    """What a `nas eval` of the plan measures with is at hand before stage 1: an evaluator folder
    (made before, with its evaluator.json, or written by an earlier stage under `produced`), or local
    CLIP / Inception weights (their paths are checked as inputs); never a download hours into the run."""
    evaluator = getattr(settings, "evaluator", None)
    if evaluator:
        path = Path(evaluator)
        if not path.resolve().is_relative_to(produced.resolve()) and not (path / EVALUATOR_FILE).is_file():
            raise NasError(f"{where('evaluator')}: {evaluator}: no {EVALUATOR_FILE} (not a folder written by "
                           "`nas data train-evaluator --out DIR`)")  # fmt: skip
    elif not any(getattr(settings, name, None) for name in LOCAL_WEIGHTS):
        raise NasError(f"{where('evaluator')}: not set, and nothing else to measure quality with offline "
                       "(a `nas data train-evaluator` folder, or local weights: --clip, --fid-weights)")  # fmt: skip


def check_inputs(settings: CommandSettings, produced: Path, where: Callable[[str], str]) -> None:
    """Check every input of one command that is not under `produced` (written by a stage);
    `where(field)` names the field as the experiment file spells it."""
    root = produced.resolve()
    for name, kind in input_fields(type(settings)).items():
        value = getattr(settings, name)
        if value is None or Path(value).resolve().is_relative_to(root):
            continue
        try:
            CHECKS[kind](str(value), settings)
        except NasError as exc:
            raise NasError(f"{where(name)}: {exc}") from None


def check_few_step(exp: Experiment, exp_path: Path) -> None:
    """The few_step: section against the rest of the plan, before the first stage: a teacher to
    distil from, a distill: section of the consistency kind without what nas run sets, step counts
    the LCM scheduler samples, and an evaluation to share (the evaluate stage's evaluator, n, seed)."""
    fs, where = exp.few_step, f"{exp_path}: few_step"
    if fs is None or fs.skip:
        return
    from nas.core.config import validate
    from nas.pipeline.few_step import SET_BY_RUN, embeds_guidance
    from nas.sample.components import LCM_MAX_STEPS, SCHEDULERS
    from nas.space.distill import CONSISTENCY_KEYS, DistillConfig

    if fs.teacher == "teacher" and exp.teacher is None:
        raise NasError(f"{where}.teacher: 'teacher' distils the experiment's teacher: U-Net, and this file has "
                       "no teacher: section (add one, with path or train), or write teacher: trained")  # fmt: skip
    allowed = ("init", *CONSISTENCY_KEYS)
    for key in fs.distill:
        if key in SET_BY_RUN:
            raise NasError(
                f"{where}.distill.{key}: set by nas run (kind: consistency, teacher: from few_step.teacher)"
            )
        if key not in allowed:
            raise NasError(f"{where}.distill.{key}: unknown key (allowed: {', '.join(allowed)})")
    validate(DistillConfig, {"teacher": "-", "kind": "consistency", **fs.distill}, f"{where}.distill")
    if not fs.steps:
        return
    far = [s for s in fs.steps if s > LCM_MAX_STEPS]
    if far:
        raise NasError(f"{where}.steps: {far[0]}: --scheduler lcm samples 1..{LCM_MAX_STEPS} steps "
                       "(the distillation grid; 1-8 is what a few-step student is for)")  # fmt: skip
    grid = SCHEDULERS["lcm"][1]["original_inference_steps"]
    if fs.distill.get("num_ddim_timesteps", grid) != grid:
        raise NasError(f"{where}.distill.num_ddim_timesteps: {fs.distill['num_ddim_timesteps']}: nas eval's lcm "
                       f"scheduler samples on the {grid}-point grid; keep {grid}, or write few_step.steps: [] "
                       "to train only")  # fmt: skip
    if exp.skipped("evaluate"):
        raise NasError(f"{where}.steps: the few-step evaluation shares the evaluate stage's evaluator, n and "
                       "seed, and evaluate: {skip: true}; run evaluate, or write few_step.steps: [] to train "
                       "the student only")  # fmt: skip
    if not embeds_guidance(fs) and fs.guidance != 1:
        raise NasError(f"{where}.guidance: {fs.guidance:g}: a student without a guidance embedding "
                       "(distill.guidance_embedding: false) has its guidance distilled in; set guidance: 1")  # fmt: skip
