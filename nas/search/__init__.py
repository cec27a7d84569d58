"""The search layer: the only package that imports Optuna and Ray. settings.py (what a search is,
light enough for the command line), objective.py (one objective), study.py (Optuna engine),
ray_backend.py (Ray Tune engine), export.py, report.py. Importing the package imports neither
Optuna nor torch; the modules that use Optuna silence its experimental-feature warnings."""
