"""The library warnings `nas` drops are real (this diffusers/transformers still emits them) and only
those are dropped: a release that fixes a cause fails the first test, so its filter goes too."""

import logging

import pytest
import torch

from nas.core.noise import HARMLESS, quiet_harmless
from nas.space import build_unet, load_arch
from tests.fixtures.space import ARCHS


@pytest.fixture
def fresh_filters():
    saved = {name: list(logging.getLogger(name).filters) for name in HARMLESS}
    for name in HARMLESS:
        logging.getLogger(name).filters.clear()
    yield
    for name, filters in saved.items():
        logging.getLogger(name).filters[:] = filters


@pytest.mark.parametrize("flex", [False, True], ids=["stock", "flex"])
def test_the_float32_cast_warning_is_real_and_dropped(flex, fresh_filters, caplog):
    model = build_unet(load_arch(ARCHS / "tiny_stock.yaml"), force_flex=flex)
    with caplog.at_level(logging.WARNING, logger="diffusers.models.modeling_utils"):
        model.to(torch.float32)
    assert any("should be kept in float32: []" in r.getMessage() for r in caplog.records)
    caplog.clear()
    quiet_harmless()
    quiet_harmless()  # idempotent
    assert len(logging.getLogger("diffusers.models.modeling_utils").filters) == 1
    with caplog.at_level(logging.WARNING, logger="diffusers.models.modeling_utils"):
        model.to(torch.float32)
        logging.getLogger("diffusers.models.modeling_utils").warning("some other diffusers warning")
    assert [r.getMessage() for r in caplog.records] == ["some other diffusers warning"]


def test_only_the_named_image_processor_fallback_is_dropped(fresh_filters, caplog):
    quiet_harmless()
    logger = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        )
        logger.warning("`CLIPTokenizer` requires sentencepiece")
    assert [r.getMessage() for r in caplog.records] == ["`CLIPTokenizer` requires sentencepiece"]
