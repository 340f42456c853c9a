"""Typed configuration values: one coercion for experiment sections and method options alike.

Accepts the TOML type, or the string form Flower's flat run-config carries (lists as "64,32,16",
booleans as "true"); anything else is refused with the key and the expected type.
"""

from __future__ import annotations

import sys
import typing
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "coerce", "tomllib"]


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Accept the TOML type, or the string form Flower's flat run-config can carry (lists as '64,32,16')."""
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table (e.g. {key}.fpb_agree = \"All\"), got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, item_type, key) for v in value]
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}") from None
    return value
