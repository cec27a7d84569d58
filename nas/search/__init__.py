"""The search layer: the only package that imports Optuna and Ray. objective.py (one objective),
study.py (Optuna engine), ray_backend.py (Ray Tune engine), export.py, report.py."""

import warnings

from optuna.exceptions import ExperimentalWarning

# Heartbeats (`fail_stale_trials`), the stale-trial retry callback (RetryHeartbeatStaleTrialCallback)
# and the `optuna.visualization.matplotlib` plots are marked experimental in Optuna (decorated with
# `experimental_func` / `experimental_class` in its source; flagged in its API reference at
# optuna.readthedocs.io). We rely on them knowingly, so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
