"""A local csv/tsv/jsonl/json/parquet file as a classification dataset (text and label columns)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import DatasetOption, class_index, require_columns
from aflora.data.sources import read_table
from aflora.data.tasks import classification_task, join_choices
from aflora.errors import DataError

log = logging.getLogger(__name__)

FILE_OPTIONS = {
    "label_words": DatasetOption(list[str], "One word per class, in class-index order (required; at least two, distinct "
                                            "ignoring case)"),
    "test_path": DatasetOption(str, "File with the test rows, same columns (required unless data.test_dataset is set)"),
    "text_column": DatasetOption(str, "Column holding the text (default 'text')"),
    "label_column": DatasetOption(str, "Column holding the label: a class index or a label word (default 'label')"),
    "instruction": DatasetOption(str, "The instruction before the text (default 'Classify this text as <label words>.')"),
    "encoding": DatasetOption(str, "Text encoding of the files (default utf-8; e.g. latin-1)"),
}


def load_file(path: Path, options: dict, *, test_elsewhere: bool = False) -> DatasetBundle:
    """`path`'s rows as a classification dataset; its test rows from data.options.test_path, or (`test_elsewhere`)
    from data.test_dataset, which the registry adds."""
    label_words = options.get("label_words") or []
    if len(label_words) < 2:
        raise DataError(
            f"loading {str(path)!r} as a classification dataset needs data.options.label_words: at least two words, one "
            f"per class in class-index order (e.g. --set 'data.options.label_words=[\"negative\",\"positive\"]'); "
            f"got {options.get('label_words')!r}."
        )
    folded = [word.strip().lower() for word in label_words]
    repeated = sorted({word for word in label_words if folded.count(word.strip().lower()) > 1})
    if repeated or not all(folded):
        raise DataError(
            f"data.options.label_words = {label_words!r} has empty or repeated words ({', '.join(map(repr, repeated))}): labels "
            "are matched ignoring case and surrounding spaces, so every class needs its own non-empty word."
        )
    test_path = options.get("test_path")
    if test_path is None and not test_elsewhere:
        raise DataError(
            f"{str(path)!r} has no test rows: set data.options.test_path = \"<a file with the same columns>\", or "
            f"data.test_dataset = <a registered dataset with the same label words> (`aflora list` shows them)."
        )
    text_column, label_column = options.get("text_column", "text"), options.get("label_column", "label")
    instruction = options.get("instruction") or f"Classify this text as {join_choices(label_words)}."
    encoding = options.get("encoding", "utf-8")

    def read(file: Path) -> list[dict]:
        return _read_labelled_file(file, text_column, label_column, label_words, encoding)

    return DatasetBundle(
        name=path.stem,
        task=classification_task(
            f"{path.stem}_classification", label_words, instruction=instruction, text_heading="Text"
        ),
        train=read(path),
        test=read(Path(test_path).expanduser()) if test_path is not None else [],
        source=f"local files: train = {path}, test = {test_path}" if test_path is not None else f"local file {path}",
    )


def _read_labelled_file(path: Path, text_column: str, label_column: str, label_words: Sequence[str],
                        encoding: str) -> list[dict]:
    fix = f'set data.options.encoding = "latin-1" (or the file\'s real encoding), or save {path.name} as UTF-8'
    table = read_table(path, encoding=encoding, how_to_fix=fix)
    require_columns(
        table, [text_column, label_column], str(path),
        'name the right ones with --set data.options.text_column="..." and --set data.options.label_column="..."',
    )
    rows, empty = [], []
    for line, row in enumerate(table, start=1):
        text = "" if row[text_column] is None else str(row[text_column])
        if not text.strip():
            empty.append(line)
            continue
        rows.append({"text": text, "label": class_index(row[label_column], label_words, f"{path} row {line}")})
    if not rows:
        raise DataError(f"{path}: every row's {text_column!r} is empty; is data.options.text_column the text column?")
    if empty:  # a stray blank line is common in hand-made files; an empty prompt teaches nothing
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        log.warning("%s: skipped %d of %d rows with an empty %r (rows %s)", path, len(empty), len(table), text_column, shown)
    return rows
