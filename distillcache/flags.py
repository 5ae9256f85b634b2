"""Command-line options generated from pydantic models, so flags and settings cannot drift.

Each field becomes ``--field-name`` (booleans ``--x/--no-x``) with the field's description
as help. Every generated option defaults to None, meaning "not given", so that the value
from a config file or the environment survives unless the flag overrides it; the model
then fills its own default.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any

import typer
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from rich.markup import escape


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """``X | None`` -> ``X``; a secret is typed as the string it is given as."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return str if annotation is SecretStr else annotation


def option(name: str, field: FieldInfo, *, env_prefix: str | None = None) -> inspect.Parameter:
    """The keyword parameter typer reads as the option for ``field``."""
    base = _base_type(field.annotation)
    name_flag = flag(name)
    declaration = f"{name_flag}/--no-{name_flag[2:]}" if base is bool else name_flag
    default = "required" if field.is_required() else f"default: {field.default}"
    if env_prefix is not None:
        default = f"env {env_prefix}{name.upper()}; {default}"
    # Escaped: rich would read "[default: 1.0]" as a style tag and drop it.
    help_text = escape(f"{field.description or ''} [{default}]".strip())
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            base | None, typer.Option(declaration, help=help_text, show_default=False)
        ],
    )


def options(
    model: type[BaseModel], names: Iterable[str] | None = None, *, env_prefix: str | None = None
) -> list[inspect.Parameter]:
    """Options for ``names`` (default: every field) of ``model``, in the model's order."""
    wanted = set(model.model_fields if names is None else names)
    return [
        option(name, field, env_prefix=env_prefix)
        for name, field in model.model_fields.items()
        if name in wanted
    ]


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options that were given on the command line."""
    return {name: value for name, value in values.items() if value is not None}
