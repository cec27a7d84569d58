"""What a training adds to its run folder (layout: nas/core/runfolder.py): metrics.csv and the loss curve."""

from __future__ import annotations

import csv
from pathlib import Path

METRICS = ("step", "loss", "val_loss", "lr", "samples_per_s")
# Added with `distill:` (nas/train/distill.py): the unweighted terms of `loss` (which is their
# weighted sum), seconds per optimizer step and the part of them spent in teacher forwards.
DISTILL_METRICS = ("task", "kd_out", "kd_feat", "step_s", "teacher_s")


class MetricsLog:
    """metrics.csv, appended row by row; on resume, rows past the checkpoint are dropped first."""

    def __init__(self, path: Path, resume_step: int | None = None, columns: tuple[str, ...] = METRICS):
        self.path = Path(path)
        self.columns = columns
        rows = self.read(self.path) if resume_step is not None and self.path.is_file() else []
        rows = [r for r in rows if int(r["step"]) <= (resume_step or 0)]
        self.kept = rows
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def add(self, **row) -> None:
        with open(self.path, "a", newline="") as handle:
            row = {k: _cell(row.get(k)) for k in self.columns}
            csv.DictWriter(handle, fieldnames=self.columns).writerow(row)

    def value_at(self, step: int, key: str) -> float | None:
        """A value kept from an earlier session (e.g. the step-0 validation loss of a resumed run)."""
        for row in self.kept:
            if int(row["step"]) == step and row[key]:
                return float(row[key])
        return None

    @staticmethod
    def read(path: Path) -> list[dict]:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_losses(metrics_csv: Path, out_png: Path) -> None:
    """Training loss (per logged interval) and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    # with `distill:`, loss is the weighted total and task the diffusion loss val_loss measures
    for key, style in (("loss", "-"), ("task", "--"), ("val_loss", "o-")):
        points = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
