"""A local csv/tsv/jsonl/json/parquet file as a classification dataset (text and label columns)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import class_index, require_columns
from aflora.data.sources import read_table
from aflora.data.tasks import classification_task, join_choices
from aflora.errors import DataError

FILE_OPTIONS = ("text_column", "label_column", "label_words", "test_path", "instruction")


def load_file(path: Path, options: dict) -> DatasetBundle:
    label_words = options.get("label_words")
    if not label_words or isinstance(label_words, str) or len(label_words) < 2:
        raise DataError(
            f"loading {str(path)!r} as a classification dataset needs label_words=[...] (at least two, "
            f"in class-index order), got {label_words!r}."
        )
    test_path = options.get("test_path")
    if test_path is None:
        raise DataError(
            f"{str(path)!r} has no test rows: pass test_path='...' (a file with the same columns) "
            f"or test_name=<registered dataset with the same labels>."
        )
    text_column, label_column = options.get("text_column", "text"), options.get("label_column", "label")
    instruction = options.get("instruction") or f"Classify this text as {join_choices(label_words)}."
    return DatasetBundle(
        name=path.stem,
        task=classification_task(
            f"{path.stem}_classification", label_words, instruction=instruction, text_heading="Text"
        ),
        train=_read_labelled_file(path, text_column, label_column, label_words),
        test=_read_labelled_file(Path(test_path).expanduser(), text_column, label_column, label_words),
        source=f"local files: train = {path}, test = {test_path}",
    )


def _read_labelled_file(path: Path, text_column: str, label_column: str, label_words: Sequence[str]) -> list[dict]:
    table = read_table(path)
    require_columns(
        table, [text_column, label_column], str(path), "name the right ones with text_column=, label_column="
    )
    return [
        {"text": str(row[text_column]), "label": class_index(row[label_column], label_words, f"{path} row {line}")}
        for line, row in enumerate(table, start=1)
    ]
