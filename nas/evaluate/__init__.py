"""Evaluation of trained runs, in one package:

- quality.py: `nas eval`, image quality against the number of denoising steps on fixed prompts and
  seeds (eval.json, quality_vs_steps.png, grid_<steps>.png);
- shapes_evaluator.py: the classifier that reads `shapes` images (prompt alignment, features for a
  Frechet distance), trained by `nas data train-evaluator` and used by quality.py;
- contrastive_evaluator.py: the same two measures for any captioned data, an image encoder trained
  contrastively against a latent cache's caption states (`nas data train-evaluator --cache`);
- evaluators.py: opens an evaluator folder as the class its evaluator.json's kind names;
- local_models.py: Inception FID and CLIP from weights on disk (nothing is downloaded);
- scorers.py: what `nas eval` measures per step count, one scorer per instrument above;
- ab_page.py: `nas compare`, the blind side-by-side page on which people vote, and the tally.

The measured comparison of several evaluated runs (`nas run`'s variants stage: steps to match,
combined speedup, ablations) is the pipeline's: nas/pipeline/comparison.py.
Imports go downward only: this package uses nas.sample, nas.data and nas.core, and is used by
nas.commands and nas.pipeline; nothing is imported here, so `import nas.evaluate.X` loads only X's
dependencies.
"""
