"""The `few_step` stage of `nas run`: a few-step student by latent consistency distillation
(`distill: {kind: consistency}`, docs/distillation.md#few-step-students-consistency-distillation),
trained with the `nas train` machinery into few_step/run and evaluated with `nas eval --scheduler
lcm` into few_step/eval, on the evaluate stage's evaluator, image count and seed.

The student is the exported (searched) architecture with a guidance embedding
(`settings.time_cond_proj_dim`, written to few_step/arch.yaml when the stage runs), initialised
from its teacher (`init: inherit`: every weight copied, the embedding started at zero):

- `teacher: trained` (default): classic LCM of the run's own U-Net, the train stage's run folder;
- `teacher: teacher`: the experiment's `teacher:` U-Net, distilled into the searched architecture.

The stage is absent unless the experiment file has a `few_step:` section. Its comparison rows
(nas/pipeline/comparison.py, `few_step_rows`) are written with the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from nas.core import limits as L
from nas.core.config import Strict
from nas.core.runfolder import ARCH

GUIDANCE_EMBEDDING_DIM = 256  # settings.time_cond_proj_dim of the student (LCM: 256, diffusers' default)
# What `nas run` sets in the distill: section; the experiment may not
SET_BY_RUN = ("teacher", "kind")
# The LCM training defaults (docs/distillation.md's example), before `few_step.set`: every caption
# kept (a dropped one learns the unguided ODE), no weight EMA (the target network is LCM's EMA)
LCM_SETS = ["cfg_drop=0.0", "ema=null"]
# `evaluate.args` the few-step evaluation sets itself (scheduler lcm, its guidance, the weights the
# run has: it keeps no EMA unless `set` asks for one)
EVAL_SET_BY_STAGE = ("scheduler", "guidance", "weights")


class FewStepStage(Strict):
    skip: bool = False  # true: keep the section but do not run it (no few-step rows)
    # trained: distil the train stage's U-Net into itself plus a guidance embedding (classic LCM);
    # teacher: distil the experiment's teacher: U-Net into the searched architecture
    teacher: Literal["trained", "teacher"] = "trained"
    # train preset or config YAML (relative to the experiment file); null: train.config, with
    # train.set applied before `set` (as a variant without `config` does)
    config: str | None = None
    # consistency training steps; null: train.max_steps when `config` is null, else the config's
    max_steps: int | None = Field(None, ge=1, le=L.MAX_STEPS)
    set: list[str] = []  # `--set` overrides, after cfg_drop=0.0 and ema=null
    # consistency keys of the distill: section (w_min, w_max, num_ddim_timesteps, target_decay,
    # loss, huber_c, guidance_embedding, init), over {kind: consistency, teacher: (nas run), init: inherit}
    distill: dict[str, Any] = {}
    # step counts evaluated with --scheduler lcm (LCM's table: 1, 2, 4, 8); []: train only
    steps: list[Annotated[int, Field(ge=1, le=L.MAX_SAMPLE_STEPS)]] = Field([1, 2, 4, 8], max_length=100)
    # guidance scale fed to the student's embedding (w = guidance - 1): diffusers'
    # LatentConsistencyModelPipeline default guidance_scale 8.0
    guidance: float = Field(8.0, ge=1, le=L.MAX_GUIDANCE)


def embeds_guidance(stage: FewStepStage) -> bool:
    """Whether the student takes w through a guidance embedding (distill.guidance_embedding's default: true)."""
    return bool(stage.distill.get("guidance_embedding", True))


def distill_overrides(stage: FewStepStage, teacher: str) -> list[str]:
    """The distill: section as `--set distill.KEY=VALUE` overrides (keys checked by check_few_step)."""
    values = {"kind": "consistency", "teacher": teacher, "init": "inherit", **stage.distill}
    return [f"distill.{key}={value}" for key, value in values.items()]


def plan_few_step(exp, base: Path, folder: Path, cache: Path, teacher: str, evaluator: str | None, make,
                  relative) -> list:  # fmt: skip
    """[train settings, eval settings?] of the stage; `make` builds a command's settings
    (nas.pipeline.plan._Builder: errors name the experiment key), `relative` resolves a preset or
    a path written in the experiment file."""
    from nas.commands import eval, train

    fs = exp.few_step
    inherited = fs.config is None  # the train stage's recipe: its config and set
    overrides = (
        (list(exp.train.set) if inherited else []) + LCM_SETS + distill_overrides(fs, teacher) + fs.set
    )
    values = {"config": relative(base, fs.config or exp.train.config), "arch": str(folder / ARCH),
              "cache": str(cache), "out": str(folder / "run"),
              "max_steps": fs.max_steps or (exp.train.max_steps if inherited else None), "overrides": overrides}  # fmt: skip
    # an inherited config with train.set is checked by the train stage first: what can still fail is few_step.set
    keys = {"overrides": "few_step.set", "config": "few_step.set" if inherited else "few_step.config"}
    commands = [make(train.Settings, values, "few_step", keys=keys)]
    if fs.steps:
        user = {k: v for k, v in exp.evaluate.args.items() if k not in EVAL_SET_BY_STAGE}
        values = {"run": str(folder / "run"), "steps": fs.steps, "n": exp.evaluate.n, "out": str(folder / "eval"),
                  "evaluator": evaluator, "scheduler": "lcm", "guidance": fs.guidance}  # fmt: skip
        keys = {"n": "evaluate.n", "evaluator": "evaluate.evaluator"}
        commands.append(
            make(eval.Settings, values, "few_step", keys=keys, user=user, user_where="evaluate.args")
        )
    return commands


def write_student_arch(exp, root: Path, folder: Path) -> Path:
    """few_step/arch.yaml: the exported architecture, with a guidance embedding unless the
    distillation bakes guidance in (distill.guidance_embedding: false)."""
    from nas.core.runfolder import write_yaml
    from nas.space import load_arch

    student = guidance_student(load_arch(root / "export" / ARCH), embeds_guidance(exp.few_step))
    write_yaml(folder / ARCH, student)
    return folder / ARCH


def guidance_student(arch, embed: bool = True):
    """The few-step student of `arch` (an Arch): the same layout named NAME-lcm, with a guidance
    embedding of GUIDANCE_EMBEDDING_DIM where it has none and `embed` asks for one."""
    settings = arch.settings
    if embed and settings.time_cond_proj_dim is None:
        settings = settings.model_copy(update={"time_cond_proj_dim": GUIDANCE_EMBEDDING_DIM})
    return arch.model_copy(update={"name": f"{arch.name}-lcm", "settings": settings})
