"""Validation shared by every config dataclass (adapter methods, quantization): field types and module patterns.

A leaf module: it imports nothing from the package but ``errors``, so any module may use it in any import order.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from lightning_peft.errors import ConfigError


def check_field_types(config: object) -> None:
    """Refuse a dataclass field whose value is not of its annotated type, naming the field: a config read from
    JSON or YAML must fail here rather than deep in the math (ints pass for floats; bools pass for neither)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        if not _matches(value, hint):
            expected = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{type(config).__name__}: {field.name}={value!r} is not of type {expected}.")

def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, (list, tuple, set)) and all(_matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)

def check_module_patterns(field: str, value: Any) -> None:
    """Refuse a ``target_modules``-like field that is neither a regex string nor a list of names."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{field}={value!r} is not a valid regular expression: {err}.") from None
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{field} must be a list of module names or a regex string, got {value!r}.")
