"""Every key of the experiment schema is in docs/pipeline.md's "Every experiment key" table, and
every key of the search-space schema in docs/formats.md's "Every space key": a key added to a model
without its row fails here, naming it."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
LEAVES = {"IntRange"}  # models documented as one value (`{min, max}`), not key by key


def _model_in(annotation) -> tuple[type[BaseModel] | None, bool]:
    """The pydantic model inside a field's type (Optional, list), and whether it is a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    for arg in typing.get_args(annotation):
        model, listed = _model_in(arg)
        if model is not None:
            return model, listed or typing.get_origin(annotation) is list
    return None, False


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, is a section) for every field, list items written `key[].field`."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        inner, listed = _model_in(field.annotation)
        if inner is not None and inner.__name__ in LEAVES:
            inner = None
        out.append((key, inner is not None))
        if inner is not None:
            out += schema_keys(inner, key + ("[]." if listed else "."))
    return out


def documented(page: str, heading: str) -> set[str]:
    """The first-column keys of the table under `## heading`."""
    text = (ROOT / "docs" / page).read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.M))


def missing(model: type[BaseModel], keys: set[str]) -> list[str]:
    """Keys without a row; a section counts as documented when any key under it has a row."""
    gone = []
    for key, section in schema_keys(model):
        if key in keys or (section and any(k.startswith((key + ".", key + "[].")) for k in keys)):
            continue
        gone.append(key)
    return gone


CASES = [
    ("nas.pipeline.experiment", "Experiment", "pipeline.md", "Every experiment key"),
    ("nas.space.schema", "Space", "formats.md", "Every space key"),
]


@pytest.mark.parametrize(("module", "name", "page", "heading"), CASES, ids=["experiment", "space"])
def test_every_schema_key_has_a_row(module, name, page, heading):
    import importlib

    model = getattr(importlib.import_module(module), name)
    keys = documented(page, heading)
    assert missing(model, keys) == [], f"docs/{page} '{heading}': add a row for each"
    known = {key for key, _ in schema_keys(model)}
    assert sorted(keys - known) == [], f"docs/{page} '{heading}': rows for keys the schema does not have"


def test_a_new_key_is_reported_missing():
    from nas.core.config import Strict

    class Inner(Strict):
        a: int = 0

    class Outer(Strict):
        inner: Inner = Inner()
        items: list[Inner] = []
        flag: bool = False

    assert [k for k, _ in schema_keys(Outer)] == ["inner", "inner.a", "items", "items[].a", "flag"]
    assert missing(Outer, {"inner.a", "flag"}) == ["items", "items[].a"]
