"""The search layer: the only package that imports Optuna and Ray. objective.py (one objective),
study.py (Optuna engine), ray_backend.py (Ray Tune engine), export.py, report.py."""

import warnings

from optuna.exceptions import ExperimentalWarning

# Heartbeats, the stale-trial callback and the matplotlib plots are marked experimental in Optuna;
# we rely on them knowingly (see REFERENCE.md), so their warnings are noise for users.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
