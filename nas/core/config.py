"""Validated YAML: strict pydantic models, one loader, one-line errors that name file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict
from pydantic_core import ErrorDetails

from nas.core.errors import NasError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for every schema: unknown keys are errors, values are not coerced across types, and
    NaN / infinity are refused in every float field (no field of any format means them)."""

    model_config = ConfigDict(
        extra="forbid", strict=False, frozen=False, validate_assignment=True, allow_inf_nan=False
    )


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error is a NasError."""
    path = Path(path)
    if not path.is_file():
        raise NasError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise NasError(f"{path}: malformed YAML{at}: {problem}") from None


def validation_message(exc: pydantic.ValidationError, source: str | Path) -> str:
    """The first pydantic error as 'FILE: field.path: what is wrong (allowed: ...)'."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
        allowed = _allowed_keys(exc, err)
        if allowed:
            msg += f" (allowed: {', '.join(allowed)})"
    elif kind == "missing":
        msg = "required key missing"
    else:
        msg = err["msg"]
        if "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    suffix = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {loc}: {msg}{suffix}"


def _allowed_keys(exc: pydantic.ValidationError, err: ErrorDetails) -> list[str]:
    model = getattr(exc, "_nas_model", None)
    if model is None:
        return []
    # Walk the location through nested models to the one that rejected the key.
    for part in err["loc"][:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        model = _inner_model(field.annotation)
        if model is None:
            return []
    return sorted(model.model_fields)


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def validate(model: type[M], data: Any, source: str | Path) -> M:
    """Validate plain data against a schema; errors become one-line NasErrors naming `source`."""
    if data is None:
        raise NasError(f"{source}: empty file (expected a mapping of {model.__name__} fields)")
    if not isinstance(data, dict):
        raise NasError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        exc._nas_model = model  # type: ignore[attr-defined]
        raise NasError(validation_message(exc, source)) from None


def load(model: type[M], path: str | Path) -> M:
    """Read a YAML file into a validated schema instance."""
    return validate(model, read_yaml(path), path)


def dump_yaml(data: BaseModel | dict, path: str | Path | None = None) -> str:
    """YAML text of a schema instance (or dict), keys in declaration order; written if `path`."""
    if hasattr(data, "to_data"):  # schemas whose None values carry meaning (Arch.mid)
        data = data.to_data()
    elif isinstance(data, BaseModel):
        data = data.model_dump(mode="json", exclude_none=True)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text
