"""The search layer: the only package that imports Optuna and Ray.

    settings.py      what a search is, light enough for the command line
    objective.py     one point: cost, budgets, proxy training; `prepare_search` (both engines' set-up)
    proxies.py       zero-cost proxies (grad_norm, snip, synflow) that filter points before training
    storage.py       the study in its storage: samplers, pruners, create/join, liveness, counting
    study.py         the Optuna engine (study.optimize, local workers)
    interrupt.py     Ctrl-C and SIGTERM: held during bookkeeping, then the running trials retried
    ray_backend.py   the Ray Tune engine (Tune trials that ask and tell the same study)
    teacher.py       a search's teacher: checks and one load per worker
    export.py, report.py, compare.py   picking a point, plots and tables, comparing studies

Importing the package imports neither Optuna nor torch; the modules that use Optuna silence its
experimental-feature warnings.
"""
