"""Evaluation of trained runs, in one package:

- quality.py: `nas eval`, image quality against the number of denoising steps on fixed prompts and
  seeds (eval.json, quality_vs_steps.png, grid_<steps>.png);
- shapes_evaluator.py: the classifier that reads `shapes` images (prompt alignment, features for a
  Frechet distance), trained by `nas data train-evaluator` and used by quality.py;
- comparison.py: the numeric comparison of several evaluated runs for `nas run`'s variants stage:
  per-step latency ratio, steps to match a baseline, combined speedup, ablations
  (comparison.{json,md,png});
- ab_page.py: `nas compare`, the blind side-by-side page on which people vote, and the tally.

Naming: "comparison" is the measured one (figures from eval.json files and timed forwards);
"A/B page" is the human one (`nas compare` keeps its command name; its module says what it builds).
Imports go downward only: this package uses nas.sample, nas.data, nas.cost and nas.runfolder, and
is used by nas.commands and nas.pipeline; nothing is imported here, so `import nas.evaluate.X`
loads only X's dependencies.
"""
