"""Open an evaluator folder (`nas data train-evaluator`) as the class its evaluator.json names.

Kinds: "shapes" (nas/evaluate/shapes_evaluator.py: reads the labels of the embedded `shapes` data;
folders written before kinds existed have no "kind" and are this one) and "contrastive"
(nas/evaluate/contrastive_evaluator.py: any captioned data, trained on a latent cache).
"""

from __future__ import annotations

from pathlib import Path

from nas.core.errors import NasError
from nas.evaluate.folder import CONFIG, read_config

KINDS = ("shapes", "contrastive")


def evaluator_kind(path: str | Path) -> str:
    """The kind in DIR/evaluator.json; NasError if DIR is not an evaluator folder."""
    doc = read_config(path)
    kind = doc.get("kind", "shapes")
    if kind not in KINDS:
        raise NasError(f"{Path(path) / CONFIG}: kind {kind!r} (allowed: {', '.join(KINDS)})")
    return kind


def load_evaluator(path: str | Path):
    """A shapes Evaluator or a ContrastiveEvaluator, from evaluator.json's kind."""
    if evaluator_kind(path) == "contrastive":
        from nas.evaluate import contrastive_evaluator

        return contrastive_evaluator.load_evaluator(path)
    from nas.evaluate import shapes_evaluator

    return shapes_evaluator.load_evaluator(path)
