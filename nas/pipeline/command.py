"""Run an experiment end to end: data -> VAE -> precompute -> (evaluator) -> (teacher) -> search -> export
-> train -> sample -> evaluate -> (few_step) -> (variants) -> report, each stage in RESULTS/<experiment>/<stage>/. A
rerun skips stages whose inputs are unchanged and resumes an interrupted one; --from STAGE redoes
from there; `skip: true` leaves out a stage after train. The whole plan (every stage's settings,
every file it reads) is checked before the first stage runs."""

from __future__ import annotations

from nas.core.settings import CommandSettings, arg
from nas.pipeline.experiment import StageName


class Settings(CommandSettings):
    command = ("run",)
    experiment: str = arg(help="experiment YAML (e.g. experiments/quickstart.yaml)", positional=True)
    start: StageName | None = arg(None, "redo from this stage on", flag="--from")
    results: str = arg("results", "parent of the experiment folder")
    dry_run: bool = arg(False, "check and print the resolved plan and exit (nothing is run or written)")


SETTINGS = Settings


def dry_run(settings: Settings) -> None:
    """The plan: each stage, its status and its `nas` command lines (printed by the pipeline)."""
    run(settings)


def run(settings: Settings) -> int:
    from nas.pipeline.runner import run_experiment

    run_experiment(settings.experiment, settings.results, start=settings.start, dry_run=settings.dry_run)
    return 0
