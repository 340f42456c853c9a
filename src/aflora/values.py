"""Typed configuration values: one coercion for experiment sections, method options and dataset options alike.

Accepts the TOML type, or the string form Flower's flat run-config carries (lists as "64,32,16", booleans as
"true"; a single value is a list of one); anything else is refused with the key and the expected type. Numbers
must be finite: no setting here means anything by inf or nan, and they would only fail rounds later.
"""

from __future__ import annotations

import math
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
    if isinstance(value, dict) and origin is not dict:  # `--set train.lr.x=1` made a table where a value belongs
        raise ConfigError(f"{key} is a single value, not a table: set it as {key}=<value>, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table (e.g. {key}.fpb_agree = \"All\"), got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(hint)
        # Every list key reads the same three spellings: a TOML list, "a,b,c" (Flower's flat run-config; a bare
        # `--set k=a,b`), or one value standing for a list of one.
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):
            value = [value]
        return [coerce(v, item_type, key) for v in value]
    try:
        typed = _scalar(value, hint)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}") from None
    if isinstance(typed, float) and not math.isfinite(typed):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return typed


def _scalar(value: Any, hint: Any) -> Any:
    """`value` as the scalar type `hint`; TypeError or ValueError when it is not one."""
    if isinstance(value, (list, dict)) and hint in (bool, int, float, str):
        raise TypeError
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
    return value
