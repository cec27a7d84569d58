"""Experiment tracking through accelerate's trackers: TensorBoard or Weights & Biases.

`report_to:` in a train config (`none`, `tensorboard`, `wandb`) sends what metrics.csv holds (loss,
its distillation terms, lr, val_loss, samples/s, s/step) to the tracker as it is written, plus the
resolved config as hyperparameters. The run folder keeps metrics.csv either way; the tracker's
files go to RUN/tracking/<run name>/ (TensorBoard: `tensorboard --logdir RUN/tracking`). Proxy runs
of a search log one run per trial, named by the trial, under results/<study>/tracking/.

Weights & Biases runs offline unless the machine is logged in (WANDB_API_KEY set or WANDB_MODE
given): nothing is uploaded without an account; `wandb sync RUN/tracking/wandb/offline-run-*`
uploads later. With `sample_every: N` a grid of a few held-out captions (nas/sample/training_grid.py,
the sampler's own pipeline; passed in by `nas train`, the training floor does not import the sampler)
goes to the tracker as the image `samples` every N steps and at the end; proxy runs never sample.
The classes are accelerate's (`accelerate.tracking.TensorBoardTracker`,
`WandBTracker`), driven directly so that a proxy run can open and close one per trial.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.core.install import pip_install

# report_to value -> the package it needs (TensorBoard's writer: torch.utils.tensorboard, which
# needs `tensorboard`, a dependency of nas; tensorboardX also serves accelerate's tracker)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_PROJECT = "nas"  # the W&B project every run and trial is logged under (runs named by folder)
REPORT_TO = ("none", *PACKAGES)


def check_report_to(report_to: str, source: str = "train config") -> None:
    """One line when the tracker's package is missing (before any training starts)."""
    package = PACKAGES.get(report_to)
    if package is None:
        return
    if importlib.util.find_spec(package) is None and not (
        report_to == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None
    ):
        raise NasError(
            f"{source}: report_to: {report_to} needs the {package} package, which is not installed"
            f" ({_install_hint(report_to)}), or set report_to to one of: {', '.join(REPORT_TO)}"
        )


def _install_hint(report_to: str) -> str:
    return pip_install("wandb") if report_to == "wandb" else pip_install("tensorboard")


def _hparams(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config flattened to `a/b` keys with the scalar types TensorBoard's hparams accept."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_hparams(value, f"{name}/"))
        elif value is None or isinstance(value, bool | int | float | str):
            out[name] = "none" if value is None else value
        else:
            out[name] = str(value)
    return out


class Tracking:
    """One run of the configured tracker; `log` drops empty values. Open it on the main process only."""

    def __init__(self, report_to: str, folder: Path, run_name: str, config: dict[str, Any], grid: Any = None):
        check_report_to(report_to)
        self.report_to, self.grid = report_to, grid  # grid: U-Net -> uint8 [H, W, 3] (or None)
        folder.mkdir(parents=True, exist_ok=True)
        if report_to == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            self.tracker: Any = TensorBoardTracker(run_name, folder)
        else:
            from accelerate.tracking import WandBTracker

            if "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"  # no account: files only, nothing uploaded
            # accelerate's WandBTracker passes its first argument to wandb.init as the project
            self.tracker = WandBTracker(WANDB_PROJECT, dir=str(folder), name=run_name)
        self.tracker.start()
        self.tracker.store_init_configuration(_hparams(config))
        self.folder = folder / run_name if report_to == "tensorboard" else folder

    def log(self, values: dict[str, Any], step: int) -> None:
        kept = {k: float(v) for k, v in values.items() if v is not None and k != "step"}
        if kept:
            self.tracker.log(kept, step=step)

    def sample(self, net, step: int, every: int, last: bool = False) -> None:
        """The grid of `net` as the image `samples` at `step`, when `every` divides it (or `last`)."""
        if self.grid is None or not every or (step % every and not last):
            return
        image = self.grid(net)
        if self.report_to == "tensorboard":  # SummaryWriter.add_images of a [1, H, W, 3] batch
            self.tracker.log_images({"samples": image[None]}, step=step, dataformats="NHWC")
        else:  # WandBTracker: a list of wandb.Image
            self.tracker.log_images({"samples": [image]}, step=step)

    def close(self) -> None:
        self.tracker.finish()


def open_tracking(
    report_to: str, folder: Path | None, run_name: str, config: dict[str, Any], main: bool, grid: Any = None
) -> Tracking | None:
    """A Tracking on the main process when `report_to` asks for one and a folder is known; `grid`:
    the sample grid of `Tracking.sample`."""
    if report_to == "none" or folder is None or not main:
        return None
    return Tracking(report_to, folder, run_name, config, grid)
