"""`distill:` settings: the schema of distillation from a teacher, shared by a training config and
a search space. Data only: importing it loads neither torch nor the trainer (nas/train/distill.py
holds the losses that these settings drive)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nas.core import limits as L
from nas.core.config import Strict


class DistillConfig(Strict):
    """`distill:` of a training config. Weights: BK-SDM's --lambda_sd, --lambda_kd_output and
    --lambda_kd_feat, all 1.0 in its scripts (kd_train_text_to_image.py and scripts/*.sh)."""

    teacher: str  # the teacher U-Net (nas.teacher.arch.load_teacher); relative to this file
    task: float = Field(1.0, ge=0, le=L.MAX_LOSS_WEIGHT)  # diffusion loss (BK-SDM lambda_sd: 1.0)
    output: float = Field(1.0, ge=0, le=L.MAX_LOSS_WEIGHT)  # output KD (lambda_kd_output: 1.0)
    # feature KD, mean over matched blocks (lambda_kd_feat: 1.0, on a SUM over its 8-9 blocks)
    feature: float = Field(1.0, ge=0, le=L.MAX_LOSS_WEIGHT)
    # inherit: start the student from the teacher's weights (nas.teacher.inherit; BK-SDM initialises
    # its pruned U-Net from SD's); scratch: random init as without distillation
    init: Literal["inherit", "scratch"] = "inherit"

    @model_validator(mode="after")
    def _some_weight(self) -> DistillConfig:
        if self.task == 0 and self.output == 0 and self.feature == 0:
            raise ValueError("task, output and feature are all 0: nothing to train (BK-SDM: 1.0 each)")
        return self
