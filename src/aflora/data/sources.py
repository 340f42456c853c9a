"""Reading local tables and finding the data directory.

Everything here returns plain ``list[dict]`` rows; what the columns *mean* is the registry's business
(``registry.py`` and ``readers/``). Every problem a person can fix raises :class:`DataError` saying what was wrong,
what was expected and how to fix it.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from aflora.errors import DataError

DATA_DIR_ENV = "AFLORA_DATA_DIR"

# extension -> reader name; ".gz" may follow any of the text formats
TEXT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}
BINARY_FORMATS = {".parquet": "parquet"}
SUPPORTED_EXTENSIONS = (*TEXT_FORMATS, *(ext + ".gz" for ext in TEXT_FORMATS), *BINARY_FORMATS)


def resolve_data_dir(explicit: str | os.PathLike | None) -> Path | None:
    """The local data directory: the explicit argument, else ``$AFLORA_DATA_DIR``, else None (use the hub).

    A directory that is named but does not exist is an error rather than a silent fall-back to the hub,
    so a typo never turns into a download (or an offline failure that hides the real cause).
    """
    if explicit is not None and str(explicit) != "":
        return _existing_dir(Path(explicit).expanduser(), origin="--data-dir or data.data_dir")
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    if from_env:
        return _existing_dir(Path(from_env).expanduser(), origin=f"${DATA_DIR_ENV}")
    return None


def _existing_dir(path: Path, *, origin: str) -> Path:
    if not path.is_dir():
        raise DataError(
            f"data directory {str(path)!r} (from {origin}) does not exist or is not a directory. "
            f"Expected a folder holding one sub-folder per dataset (e.g. ag_news/, dolly_15k/). "
            f"Fix the path (--data-dir, data.data_dir or ${DATA_DIR_ENV}), or unset it to load from the hub."
        )
    return path


def read_table(path: str | os.PathLike, *, columns: list[str] | None = None, encoding: str = "utf-8",
               how_to_fix: str = "save it as UTF-8") -> list[dict]:
    """Read a local csv / tsv / jsonl / json (a list of objects) / parquet file into a list of dicts.

    ``.gz`` may follow the text formats. ``columns`` names the columns of a *headerless* csv/tsv (the
    official AG News files have no header); without it the first line is the header. ``how_to_fix`` ends
    the message of a file that is not ``encoding`` text: how the caller's user passes another encoding.
    A file without rows is an error: every table here is read to be used.
    """
    path = Path(path)
    file_format = table_format(path)
    if not path.is_file():
        raise DataError(
            f"no file at {str(path)!r}. Expected an existing table in one of the formats "
            f"{', '.join(SUPPORTED_EXTENSIONS)}; check the path (and --data-dir / ${DATA_DIR_ENV})."
        )
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"{encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252).") from None
    if columns is not None and file_format not in ("csv", "tsv"):
        raise DataError(
            f"columns= names the columns of a headerless csv/tsv file, but {path.name!r} is {file_format}, "
            f"whose rows already carry their column names. Drop the columns argument."
        )
    try:
        if file_format == "parquet":
            rows = _read_parquet(path)
        else:
            with _open_text(path, encoding) as stream:
                if file_format in ("csv", "tsv"):
                    rows = _read_delimited(stream, path, delimiter="," if file_format == "csv" else "\t", columns=columns)
                elif file_format == "jsonl":
                    rows = _read_jsonl(stream, path)
                else:
                    rows = _read_json_list(stream, path)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{str(path)!r} is not valid {encoding} text ({error.reason} at byte {error.start}): {how_to_fix}."
        ) from None
    except (OSError, EOFError) as error:  # a truncated .gz, a file that vanished or cannot be read
        raise DataError(f"cannot read {str(path)!r}: {error}. Check that the file is complete and readable.") from None
    if not rows:
        what = "a header line but no rows" if file_format in ("csv", "tsv") and columns is None else "no rows"
        raise DataError(f"{str(path)!r} has {what}; expected at least one row of data.")
    return rows


def table_format(path: Path) -> str:
    """The reader a file name asks for ('csv', 'tsv', 'jsonl', 'json' or 'parquet')."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    extension = suffixes[-2] if compressed and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    known = TEXT_FORMATS if compressed else {**TEXT_FORMATS, **BINARY_FORMATS}
    if extension not in known:
        raise DataError(
            f"cannot read {path.name!r}: unknown file type {''.join(path.suffixes) or '(no extension)'!r}. "
            f"Supported extensions: {', '.join(SUPPORTED_EXTENSIONS)}. Convert the file or rename it."
        )
    return known[extension]


def _open_text(path: Path, encoding: str) -> IO[str]:
    # newline="" lets the csv module see quoted newlines inside fields (TFNS tweets have them)
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def _read_delimited(stream: IO[str], path: Path, *, delimiter: str, columns: list[str] | None) -> list[dict]:
    if columns is None:
        reader = csv.DictReader(stream, delimiter=delimiter)
        rows = list(reader)
        if reader.fieldnames is None:
            raise DataError(f"{str(path)!r} is empty; expected a header line followed by rows.")
        return rows
    rows = []
    for line_number, values in enumerate(csv.reader(stream, delimiter=delimiter), start=1):
        if not values:
            continue  # blank line
        if len(values) != len(columns):
            raise DataError(
                f"{str(path)!r} line {line_number} has {len(values)} fields but columns= names {len(columns)} "
                f"({columns}). Check the delimiter and whether the file has a header (then drop columns=)."
            )
        rows.append(dict(zip(columns, values, strict=True)))
    return rows


def _read_jsonl(stream: IO[str], path: Path) -> list[dict]:
    return [_json_object(line, path, line_number) for line_number, line in _non_blank_lines(stream)]


def _non_blank_lines(stream: IO[str]) -> Iterator[tuple[int, str]]:
    for line_number, line in enumerate(stream, start=1):
        if line.strip():
            yield line_number, line


def _json_object(text: str, path: Path, line_number: int) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{str(path)!r} line {line_number} is not valid JSON ({error.msg}).") from error
    if not isinstance(value, dict):
        raise DataError(
            f"{str(path)!r} line {line_number} holds a {type(value).__name__}, expected one JSON object per line."
        )
    return value


def _read_json_list(stream: IO[str], path: Path) -> list[dict]:
    try:
        value = json.load(stream)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}). "
            f"If it holds one object per line, name it .jsonl."
        ) from error
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise DataError(f"{str(path)!r} must hold a JSON list of objects ([{{...}}, {{...}}]).")
    return value


def _read_parquet(path: Path) -> list[dict]:
    # pyarrow is the fastest way; pandas and datasets both sit on it but may be what is installed
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        pass
    else:
        try:
            return parquet.read_table(path).to_pylist()
        except Exception as error:  # pyarrow.ArrowInvalid and kin: not a parquet file, or a damaged one
            raise DataError(f"{str(path)!r} is not a readable parquet file ({error}); check the file or its extension.") from None
    try:
        import pandas

        return pandas.read_parquet(path).to_dict("records")
    except ImportError:
        pass
    import datasets

    return datasets.Dataset.from_parquet(str(path)).to_list()
