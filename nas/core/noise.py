"""Library log warnings that tell a `nas` user nothing, each dropped by its exact text, with the
reason it is harmless. Every other warning passes. `nas.cli.main` installs them; a library release
that fixes a cause makes tests/core/test_noise.py fail, so the filter goes with it.

A base layer: the standard `logging` only (diffusers and transformers log through it)."""

from __future__ import annotations

import logging
import re

HARMLESS: dict[str, tuple[str, str]] = {
    # logger name -> (message pattern, why it is harmless)
    "diffusers.models.modeling_utils": (
        r"should be kept in float32: \[\]\.",
        "diffusers 0.42's ModelMixin.to() warns on every cast to a dtype, even when no module must stay in"
        " float32 (`self._keep_in_fp32_modules or []` is then tested `is not None`): the list it names is empty",
    ),
    "transformers.utils.import_utils": (
        r"`(CLIP|Siglip)ImageProcessor` requires torchvision \(not installed\); falling back to",
        "transformers 5 resolves the image processors that diffusers' pipeline modules import to their PIL"
        " versions without torchvision; nas pipelines have no safety checker or image encoder that uses them",
    ),
}


class DropMessage(logging.Filter):
    """Drops records whose message matches `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_harmless() -> None:
    """Install the HARMLESS filters on their loggers (idempotent)."""
    for name, (pattern, _why) in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(DropMessage(pattern))
