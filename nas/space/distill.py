"""`distill:` settings: the schema of distillation from a teacher, shared by a training config and
a search space. Data only: importing it loads neither torch nor the trainer (nas/train/distill.py
holds the BK-SDM losses, nas/train/consistency.py the consistency distillation these settings drive).

Two kinds, one section: `kind: bk_sdm` (the default, so every file written before `kind` existed
means what it meant) and `kind: consistency`. Each kind has its own keys besides the shared
`teacher`, `init` and `kind`; a key of the other kind is a one-line error. Dumped, a section holds
only its own kind's keys (a bk_sdm section is exactly what it was before `kind` existed, so resuming
older runs and comparing configs keep working).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from nas.core import limits as L
from nas.core.config import Strict

KINDS = ("bk_sdm", "consistency")
SHARED_KEYS = ("teacher", "kind", "init")
BK_SDM_KEYS = ("task", "output", "feature")
CONSISTENCY_KEYS = (
    "num_ddim_timesteps",
    "w_min",
    "w_max",
    "guidance_embedding",
    "target_decay",
    "loss",
    "huber_c",
)
KIND_KEYS = {"bk_sdm": BK_SDM_KEYS, "consistency": CONSISTENCY_KEYS}


class DistillConfig(Strict):
    """`distill:` of a training config.

    bk_sdm weights: BK-SDM's --lambda_sd, --lambda_kd_output and --lambda_kd_feat, all 1.0 in its
    scripts (kd_train_text_to_image.py and scripts/*.sh).
    consistency: latent consistency distillation (Luo et al. 2023), the defaults those of diffusers'
    examples/consistency_distillation (train_lcm_distill_sd_wds.py and its README's command).
    """

    teacher: str  # the teacher U-Net (nas.teacher.arch.load_teacher); relative to this file
    # bk_sdm: task / output / feature KD (nas/train/distill.py); consistency: the student learns the
    # teacher's guided probability-flow ODE solution in one call (nas/train/consistency.py)
    kind: Literal["bk_sdm", "consistency"] = "bk_sdm"
    # inherit: start the student from the teacher's weights (nas.teacher.inherit; BK-SDM initialises
    # its pruned U-Net from SD's, LCM its student from the teacher); scratch: random init
    init: Literal["inherit", "scratch"] = "inherit"

    # --- kind: bk_sdm
    task: float = Field(1.0, ge=0, le=L.MAX_LOSS_WEIGHT)  # diffusion loss (BK-SDM lambda_sd: 1.0)
    output: float = Field(1.0, ge=0, le=L.MAX_LOSS_WEIGHT)  # output KD (lambda_kd_output: 1.0)
    # feature KD, mean over matched blocks (lambda_kd_feat: 1.0, on a SUM over its 8-9 blocks)
    feature: float = Field(1.0, ge=0, le=L.MAX_LOSS_WEIGHT)

    # --- kind: consistency
    # DDIM solver steps over the teacher's training schedule (LCM --num_ddim_timesteps: 50); must
    # divide diffusion.num_train_timesteps, so the grid k*i - 1 ends at T - 1 (LCMScheduler's grid)
    num_ddim_timesteps: int = Field(50, ge=1, le=L.MAX_TRAIN_TIMESTEPS)
    # guidance weight w ~ U[w_min, w_max] per sample, x = cond + w (cond - uncond): a pipeline's
    # guidance_scale is w + 1 (LCM --w_min 5, --w_max 15)
    w_min: float = Field(5.0, ge=0, le=L.MAX_GUIDANCE)
    w_max: float = Field(15.0, ge=0, le=L.MAX_GUIDANCE)
    # true: the student takes w through its guidance embedding (settings.time_cond_proj_dim; LCM);
    # false: w is baked in (set w_min = w_max; LCM-LoRA), the student is called without it
    guidance_embedding: bool = True
    # EMA decay of the target network, per optimizer step (LCM --ema_decay: 0.95); 0: the student itself
    target_decay: float = Field(0.95, ge=0, lt=1)
    # consistency loss: l2 (MSE) or pseudo-Huber sqrt(d^2 + c^2) - c (the LCM README's command: huber)
    loss: Literal["l2", "huber"] = "huber"
    # pseudo-Huber c, in latent units (LCM --huber_c: 0.001); latents are ~unit scale, hence <= 1
    huber_c: float = Field(0.001, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "bk_sdm")
        if kind not in KINDS:
            return data  # the Literal reports it, with the allowed values
        other = next(k for k in KINDS if k != kind)
        mixed = [key for key in KIND_KEYS[other] if key in data]
        if mixed:
            own = ", ".join((*SHARED_KEYS, *KIND_KEYS[kind]))
            raise ValueError(
                f"{mixed[0]} is a key of kind: {other}, this section is kind: {kind} (its keys: {own})"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> DistillConfig:
        if self.kind == "bk_sdm" and self.task == 0 and self.output == 0 and self.feature == 0:
            raise ValueError("task, output and feature are all 0: nothing to train (BK-SDM: 1.0 each)")
        if self.kind == "consistency" and self.w_min > self.w_max:
            raise ValueError(f"w_min {self.w_min} > w_max {self.w_max}: give w_min <= w_max (LCM: 5 and 15)")
        return self

    @model_serializer(mode="wrap")
    def _own_keys(self, handler) -> dict[str, Any]:
        """Only this kind's keys; `kind` itself only when it is not the default bk_sdm."""
        data = handler(self)
        drop = set(KIND_KEYS["consistency" if self.kind == "bk_sdm" else "bk_sdm"])
        if self.kind == "bk_sdm":
            drop.add("kind")
        return {key: value for key, value in data.items() if key not in drop}
