"""What every reader shares: hub access that fails with a fixable message, and checked row fields."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aflora import hub
from aflora.data.sources import DATA_DIR_ENV
from aflora.errors import DataError


@dataclass(frozen=True)
class DatasetOption:
    """One key of data.options a dataset understands: its type (checked like every config value) and its help."""

    type: Any
    help: str


class HubUnavailable(Exception):
    """``datasets.load_dataset`` failed; turned into a DataError that names the local folder too."""


def hub_splits(hub_id: str, config: str | None = None):
    if not hub.offline_mode():  # offline mode reads the cache at once; an unanswering hub would be retried for ~25 s
        unreachable = hub.hub_unreachable_reason()
        if unreachable:
            raise HubUnavailable(f"the hub at {unreachable}; if the dataset is in the Hugging Face cache, "
                                 "HF_HUB_OFFLINE=1 reads it from there")
    try:
        import datasets

        return datasets.load_dataset(hub_id, config)
    except Exception as error:  # datasets raises many types (connection, not found, offline mode...)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise HubUnavailable(f"{type(error).__name__}: {first_line}") from error


def as_int(value, where: str) -> int:
    """'2', '2.0', 2.0 and 2 are all class 2 (the AG News sample stores labels as floats)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer():
        raise DataError(f"{where}: label {value!r} is not a whole number.")
    return int(number)


def class_index(value, label_words: Sequence[str], where: str) -> int:
    """A label given as a class index or as one of ``label_words`` (any case) -> checked class index."""
    if isinstance(value, str) and value.strip().lower() in [word.lower() for word in label_words]:
        return [word.lower() for word in label_words].index(value.strip().lower())
    try:
        index = as_int(value, where)
    except DataError:
        raise DataError(
            f"{where}: label {value!r} is neither a class index 0-{len(label_words) - 1} "
            f"nor one of the label words {', '.join(label_words)}."
        ) from None
    if not 0 <= index < len(label_words):
        raise DataError(f"{where}: label {index} is outside 0-{len(label_words) - 1} ({', '.join(label_words)}).")
    return index


def unique_by_text(rows: Iterable[dict]) -> list[dict]:
    """Keep the first row of each text (the AG News train subsets are overlapping random samples)."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            unique.append(row)
    return unique


def require_columns(
    rows: list[dict], columns: Sequence[str], where: str, how_to_fix: str = "see the data folder's SOURCE.md"
) -> None:
    found = list(rows[0]) if rows else []
    missing = [column for column in columns if column not in found]
    if missing:
        raise DataError(
            f"{where} has no column(s) {', '.join(map(repr, missing))}; columns found: {', '.join(found) or 'none'}. "
            f"Expected {', '.join(columns)}: {how_to_fix}."
        )


def split_rows(splits, name: str, hub_id: str) -> list[dict]:
    if name not in splits:
        raise DataError(
            f"hub dataset {hub_id} has no {name!r} split (found {', '.join(splits)}); its layout may have changed. "
            f"Use a local copy instead (--data-dir or {DATA_DIR_ENV})."
        )
    return list(splits[name])
