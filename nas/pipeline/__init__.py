"""`nas run`: experiment files -> stages -> results/<experiment>/.

experiment.py   the experiment file's schema (every key: docs/pipeline.md), which stages may be skipped
plan.py         the stages of an experiment (each one `nas` command), fingerprints
check.py        every file and setting of the plan checked before the first stage runs
runner.py       runs, skips and resumes stages; copies the small results
few_step.py     the few_step stage: a consistency-distilled few-step student, evaluated with lcm
variants.py     the variants stage: runs beside the searched one (baselines, ablations)
comparison.py   the variants' measured comparison (comparison.{json,md,png}); the few-step rows
command.py      the `nas run` command itself (above nas/commands/, since it drives them)
"""

from nas.pipeline.experiment import STAGES, Experiment
from nas.pipeline.plan import plan
from nas.pipeline.runner import load_experiment, run_experiment

__all__ = ["STAGES", "Experiment", "load_experiment", "plan", "run_experiment"]
