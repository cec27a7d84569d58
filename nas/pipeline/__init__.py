"""`nas run`: experiment files -> stages -> results/<experiment>/."""

from nas.pipeline.plan import STAGES, Experiment, plan
from nas.pipeline.runner import load_experiment, run_experiment

__all__ = ["STAGES", "Experiment", "load_experiment", "plan", "run_experiment"]
