"""Command settings: one strict pydantic model per `nas` command (or sub-action).

The model is the single description of a command's inputs: argparse gets its flags from it
(`add_arguments`: positional or `--flag`, `help` from the field description, the choices of
`Literal[...]` in the usage, booleans as switches, lists as several values), the command line
becomes a validated model (`from_namespace`: types, bounds and choices checked by pydantic, one
line naming the flag on error), `--dry-run` prints it, and `nas run` builds the same models
directly from an experiment file and shows them as the equivalent command line (`to_argv`).

Field metadata (`arg(...)`): `positional=True` for a positional argument, `flag="--from"` for a flag
whose name is not the field's, `input=KIND` for a file or folder the command reads (checked before
`nas run` starts; see nas/pipeline/check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import Field, field_validator

from nas.core.config import Strict, allowed_keys, first_errors, unknown_key
from nas.core.errors import NasError


def arg(
    default: Any = ...,
    help: str = "",
    *,
    positional: bool = False,
    flag: str | None = None,
    input: str | None = None,
    **constraints: Any,
) -> Any:
    """A settings field with its command-line metadata; `constraints` are pydantic's (ge, le, ...)."""
    extra = {"positional": positional, "flag": flag, "input": input}
    return Field(
        default, description=help, json_schema_extra={k: v for k, v in extra.items() if v}, **constraints
    )


class CommandSettings(Strict):
    """Base of every command's settings; `command` is the `nas` words before the flags."""

    command: ClassVar[tuple[str, ...]] = ()
    dry_run: bool = arg(False, "print the resolved settings as JSON and exit (nothing is run or written)")

    def resolved(self) -> dict:
        return self.model_dump(mode="json", exclude={"dry_run"})


def split_commas(value: Any) -> Any:
    """'10,20' or ['10,20', '30'] -> ['10', '20', '30'] for list fields given with commas."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return value
    out = []
    for item in value:
        out += [p.strip() for p in item.split(",") if p.strip()] if isinstance(item, str) else [item]
    return out


def comma_list(*fields: str):
    """A validator letting list fields be written '10,20,30' as well as '10 20 30'."""
    return field_validator(*fields, mode="before")(lambda cls, v: split_commas(v))


# ---- model -> argparse ---------------------------------------------------------------------------


def _meta(field: pydantic.fields.FieldInfo) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _shape(annotation: Any) -> tuple[Any, bool, tuple | None]:
    """(scalar type, is a list, Literal choices) of a field annotation, Optional removed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _shape(args[0])
    if origin in (list, tuple):
        inner, _, choices = _shape(typing.get_args(annotation)[0])
        return inner, True, choices
    if origin is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), False, choices
    if annotation is Path:
        return str, False, None
    return annotation, False, None


def input_fields(model: type[CommandSettings]) -> dict[str, str]:
    """{field: kind} of the fields naming a file or folder the command reads."""
    return {n: _meta(f)["input"] for n, f in model.model_fields.items() if _meta(f).get("input")}


def flag_name(name: str, field: pydantic.fields.FieldInfo) -> str:
    meta = _meta(field)
    if meta.get("positional"):
        return name.upper()
    return meta.get("flag") or "--" + name.replace("_", "-")


def _help(field: pydantic.fields.FieldInfo) -> str:
    text = field.description or ""
    default = field.get_default()
    if (
        default is not None
        and default is not False
        and default not in ([], ())
        and not field.is_required()
        and "default" not in text
    ):
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        text += f" (default {shown})"
    return text


def add_arguments(parser: argparse.ArgumentParser, model: type[CommandSettings]) -> None:
    """One argparse argument per field. Defaults stay in the model: an absent flag is absent from
    the Namespace (argparse.SUPPRESS), so the model applies its own default."""
    for name, field in model.model_fields.items():
        kind, many, choices = _shape(field.annotation)
        kw: dict[str, Any] = {"help": _help(field), "default": argparse.SUPPRESS}
        if kind is bool and not many:
            kw["action"] = "store_true"
        else:  # values stay text: the model converts them, with a one-line error naming the flag
            if choices:  # shown in the help; checked by the model, for a one-line error naming them
                kw["metavar"] = "{" + ",".join(map(str, choices)) + "}"
            if many:
                kw["nargs"] = "+"
                kw["action"] = "extend"
        if _meta(field).get("positional"):
            if many:
                kw["nargs"] = "+" if field.is_required() else "*"
                kw.pop("action", None)
            elif not field.is_required():
                kw["nargs"] = "?"
            kw.setdefault("metavar", name.upper())
            parser.add_argument(name, **kw)
        else:
            if field.is_required():
                kw["required"] = True
            parser.add_argument(flag_name(name, field), dest=name, **kw)


def add_actions(parser: argparse.ArgumentParser, models: dict[str, type[CommandSettings]]) -> None:
    """Sub-actions (`nas data shapes`, `nas data train-evaluator`): one model each."""
    sub = parser.add_subparsers(dest="_action", required=True, metavar="ACTION")
    for action, model in models.items():
        doc = (model.__doc__ or "").strip()
        p = sub.add_parser(action, help=doc.splitlines()[0] if doc else None, description=doc)
        add_arguments(p, model)
        p.set_defaults(_model=model)


# ---- validation and errors -----------------------------------------------------------------------


def settings_message(
    exc: pydantic.ValidationError, model: type[CommandSettings], name_of, allowed: list[str] | None = None
) -> str:
    """The first error as 'NAME: what is wrong (allowed: ...)', an unknown setting before the rest
    (with the allowed one it is closest to); `name_of(field)` spells the field as the user wrote it
    (`--sampler` on the command line, `search.sampler` in an experiment); `allowed`: the names an
    unknown key may be instead, as written (default: every field, spelt by `name_of`)."""
    err = first_errors(exc)[0]
    loc = err["loc"]
    field = model.model_fields.get(str(loc[0])) if loc else None
    name = name_of(str(loc[0])) if loc else "(settings)"
    name += "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    if err["type"] == "extra_forbidden":
        if len(loc) > 1:  # a key inside a setting that is itself a mapping of known keys
            return f"{name}: {unknown_key(loc[-1], allowed_keys(model, loc[:-1]))}"
        if allowed:
            return f"{name}: {unknown_key(loc[0], allowed, 'setting')}"
        names = [n for n in model.model_fields if n != "dry_run"]
        return f"{name}: {unknown_key(loc[0], names, 'setting', name_of)}"
    if err["type"] == "missing":
        return f"{name}: required"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], dict | list):
        msg += f" (got {err['input']})"  # as typed on the command line
    if field is not None:
        choices = _shape(field.annotation)[2]
        if choices and err["type"] == "literal_error":
            msg = f"unknown value {err['input']!r} (allowed: {', '.join(map(str, choices))})"
    return f"{name}: {msg}"


def build(
    model: type[CommandSettings],
    values: dict[str, Any],
    name_of,
    prefix: str = "",
    allowed: list[str] | None = None,
) -> CommandSettings:
    """Validate `values` into `model`; a failure is one NasError line starting with `prefix`
    (`allowed`: the settings an unknown key may be instead; default all of them)."""
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise NasError(prefix + settings_message(exc, model, name_of, allowed)) from None


def from_namespace(model: type[CommandSettings], ns: argparse.Namespace) -> CommandSettings:
    """The validated settings of a parsed command line; errors name the flag."""
    values = {k: v for k, v in vars(ns).items() if k in model.model_fields}
    return build(
        model, values, lambda n: flag_name(n, model.model_fields[n]) if n in model.model_fields else n
    )


# ---- model -> command line -----------------------------------------------------------------------


def to_argv(settings: CommandSettings) -> list[str]:
    """The `nas` command line (without 'nas') that gives these settings: the flags that differ
    from the defaults, in field order. `from_namespace(parse(to_argv(s))) == s`."""
    positional, flags = [], []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if not field.is_required() and value == field.get_default():
            continue
        if isinstance(value, Path):
            value = str(value)
        values = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
        if _meta(field).get("positional"):
            positional += values
        elif isinstance(value, bool):
            flags += [flag_name(name, field)] if value else []
        elif value is not None:
            flags += [flag_name(name, field), *values]
    return [*settings.command, *positional, *flags]


def print_settings(settings: CommandSettings, extra: dict | None = None) -> None:
    """What `--dry-run` prints: the resolved settings (and what the command derived from them)."""
    print(json.dumps({**settings.resolved(), **(extra or {})}, indent=2, default=str))


def execute(settings: CommandSettings) -> int:
    """Run a command from its settings (`nas run` calls this too); --dry-run prints them instead."""
    module = sys.modules[type(settings).__module__]
    if settings.dry_run:  # a module's dry_run() adds what it derives, or prints its own (None)
        extra = module.dry_run(settings) if hasattr(module, "dry_run") else {}
        if extra is not None:
            print_settings(settings, extra)
        return 0
    return int(module.run(settings) or 0)
