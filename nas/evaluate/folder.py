"""An evaluator folder on disk (`nas data train-evaluator`): its two file names, its JSON read with
a one-line error, and its weights loaded into a built model (safetensors: never unpickled).
Shared by nas/evaluate/evaluators.py, which opens a folder as its kind, and both kinds' loaders."""

from __future__ import annotations

import json
from pathlib import Path

from nas.core.errors import NasError

CONFIG, WEIGHTS = "evaluator.json", "evaluator.safetensors"


def read_config(path: str | Path) -> dict:
    """DIR/evaluator.json as a dict; NasError if DIR is not an evaluator folder or the JSON is bad."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise NasError(f"{path}: not an evaluator folder (needs {CONFIG} and {WEIGHTS}; "
                       "make one with `nas data train-evaluator`)")  # fmt: skip
    try:
        doc = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise NasError(f"{path / CONFIG}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise NasError(f"{path / CONFIG}: not a JSON object; retrain the evaluator")
    return doc


def load_weights(model, path: str | Path):
    """`model` with DIR/evaluator.safetensors loaded; NasError when they do not fit its config."""
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise NasError(f"{weights}: weights do not fit the config ({str(exc).splitlines()[0]})") from None
    return model
