"""Validated YAML: strict pydantic models, one loader, one-line errors that name file and field."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
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


# difflib's own default similarity ratio: `resnet` -> `resnets` scores 0.92, `skipp` -> `skip`
# 0.89; `attn` -> `attentions` 0.57 and `colour` -> `channels` 0.29 get the allowed keys listed
CLOSE_MATCH_CUTOFF = 0.6


def closest(key: object, allowed: Sequence[str]) -> str | None:
    """The allowed name closest to a misspelt `key` (difflib), or None when none is close."""
    found = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=CLOSE_MATCH_CUTOFF)
    return found[0] if found else None


def unknown_key(key: object, allowed: Sequence[str], what: str = "key", spell=str) -> str:
    """'unknown key; did you mean `resnets`?' for a near miss of an allowed name, else
    'unknown key (allowed: ...)'; `spell(name)` writes a name as the user would (a flag, a path)."""
    near = closest(key, allowed)
    if near is not None:
        return f"unknown {what}; did you mean `{spell(near)}`?"
    return f"unknown {what} (allowed: {', '.join(map(spell, allowed))})" if allowed else f"unknown {what}"


def first_errors(exc: pydantic.ValidationError) -> list[ErrorDetails]:
    """The errors, unknown keys first: a misspelt key also makes the key it meant missing, and the
    typo is the one to report."""
    errors = exc.errors()
    return [e for e in errors if e["type"] == "extra_forbidden"] + [
        e for e in errors if e["type"] != "extra_forbidden"
    ]


def validation_message(exc: pydantic.ValidationError, source: str | Path) -> str:
    """The first pydantic error as 'FILE: field.path: what is wrong (allowed: ...)', an unknown key
    before everything else (with the allowed key it is closest to)."""
    errors = first_errors(exc)
    err = errors[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    rest = errors[1:]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(exc, err)
        msg, near = unknown_key(err["loc"][-1], allowed), closest(err["loc"][-1], allowed)
        if near is not None:  # the key it meant, missing only because of the typo, is no other error
            meant = (*err["loc"][:-1], near)
            rest = [e for e in rest if not (e["type"] == "missing" and tuple(e["loc"]) == meant)]
    elif kind == "missing":
        msg = "required key missing"
    else:
        msg = err["msg"]
        if "input" in err and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
    more = len(rest)
    suffix = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{source}: {loc}: {msg}{suffix}"


def _allowed_keys(exc: pydantic.ValidationError, err: ErrorDetails) -> list[str]:
    model = getattr(exc, "_nas_model", None)
    if model is None:
        return []
    return allowed_keys(model, err["loc"][:-1])


def allowed_keys(model: type[BaseModel], loc: Sequence[int | str]) -> list[str]:
    """The keys of the model found by walking `loc` (list indices skipped) through nested models."""
    inner: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = inner.model_fields.get(part) if inner is not None else None
        if field is None:
            return []
        inner = _inner_model(field.annotation)
    return sorted(inner.model_fields) if inner is not None else []


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
