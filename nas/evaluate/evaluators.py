"""Open an evaluator folder (`nas data train-evaluator`) as the class its evaluator.json names.

Kinds: "shapes" (nas/evaluate/shapes_evaluator.py: reads the labels of the embedded `shapes` data;
folders written before kinds existed have no "kind" and are this one) and "contrastive"
(nas/evaluate/contrastive_evaluator.py: any captioned data, trained on a latent cache).
"""

from __future__ import annotations

import json
from pathlib import Path

from nas.core.errors import NasError

CONFIG, WEIGHTS = "evaluator.json", "evaluator.safetensors"
KINDS = ("shapes", "contrastive")


def evaluator_kind(path: str | Path) -> str:
    """The kind in DIR/evaluator.json; NasError if DIR is not an evaluator folder."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise NasError(f"{path}: not an evaluator folder (needs {CONFIG} and {WEIGHTS}; "
                       "make one with `nas data train-evaluator`)")  # fmt: skip
    try:
        doc = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise NasError(f"{path / CONFIG}: not valid JSON ({exc.msg})") from None
    kind = doc.get("kind", "shapes") if isinstance(doc, dict) else None
    if kind not in KINDS:
        raise NasError(f"{path / CONFIG}: kind {kind!r} (allowed: {', '.join(KINDS)})")
    return kind


def load_evaluator(path: str | Path):
    """A shapes Evaluator or a ContrastiveEvaluator, from evaluator.json's kind."""
    if evaluator_kind(path) == "contrastive":
        from nas.evaluate import contrastive_evaluator

        return contrastive_evaluator.load_evaluator(path)
    from nas.evaluate import shapes_evaluator

    return shapes_evaluator.load_evaluator(path)
