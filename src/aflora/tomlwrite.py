"""Writing experiment values back as TOML: the one writer behind experiment files and `key=value` overrides.

`tomllib` (values.py) reads TOML but nothing in the standard library writes it. The values of an experiment are
few kinds (bool, int, float, str and lists of them), so a literal per value is all it takes; each one parses back
to exactly the value written (`config.parse_override`, `config.load_config`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def toml_literal(value: Any) -> str:
    """A value written so that `key=<literal>` overrides parse back to exactly it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # 1e-05, inf and nan are TOML too
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def write_flat_toml(flat: Mapping[str, Any], path: Path) -> Path:
    """`dotted.key = literal` lines (a flattened experiment, `config.flatten`) as a TOML file that reads back the same."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {toml_literal(value)}\n" for key, value in flat.items()))
    return path
