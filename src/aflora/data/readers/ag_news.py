"""AG News: 4-way topic classification from the official csv files or the hub."""

from __future__ import annotations

from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import as_int, class_index, hub_splits, require_columns, split_rows, unique_by_text
from aflora.data.sources import read_table
from aflora.data.tasks import AG_NEWS_LABEL_WORDS, Task, clean_news_text, topic_classification_task

HUB_ID = "fancyzhx/ag_news"
AG_NEWS_COLUMNS = ["class", "title", "description"]  # the official files have no header
AG_NEWS_TRAIN_FILES = ("train_first2000.csv", "train_sample5000_text_label.csv")


def _ag_news_task() -> Task:
    return topic_classification_task(AG_NEWS_LABEL_WORDS)


def _ag_news_row(text: str, label: int) -> dict:
    return {"text": clean_news_text(text), "label": label}


def _read_ag_news_official(path: Path) -> list[dict]:
    """Official format: class 1-4, title, description; text = title + ' ' + description."""
    rows = []
    for line, row in enumerate(read_table(path, columns=AG_NEWS_COLUMNS), start=1):
        where = f"{path} row {line}"
        label = class_index(as_int(row["class"], where) - 1, AG_NEWS_LABEL_WORDS, where)
        rows.append(_ag_news_row(f"{row['title']} {row['description']}", label))
    return rows


def _read_ag_news_text_label(path: Path) -> list[dict]:
    table = read_table(path)
    require_columns(table, ["text", "label"], str(path))
    return [
        _ag_news_row(row["text"], class_index(row["label"], AG_NEWS_LABEL_WORDS, f"{path} row {line_number}"))
        for line_number, row in enumerate(table, start=1)
    ]


def load_local(folder: Path, options: dict) -> DatasetBundle:
    # the description-only tsv is ignored: without titles its rows are a different input distribution
    first_rows, sample_file = folder / AG_NEWS_TRAIN_FILES[0], folder / AG_NEWS_TRAIN_FILES[1]
    train = unique_by_text(_read_ag_news_official(first_rows) + _read_ag_news_text_label(sample_file))
    return DatasetBundle(
        name="ag_news",
        task=_ag_news_task(),
        train=train,
        test=_read_ag_news_official(folder / "test.csv"),
        source=f"local {folder}: train = {' + '.join(AG_NEWS_TRAIN_FILES)} (de-duplicated), test = test.csv",
    )


def load_hub(options: dict) -> DatasetBundle:
    splits = hub_splits(HUB_ID)

    def rows(split: str) -> list[dict]:
        where = f"{HUB_ID} {split}"
        return [
            _ag_news_row(row["text"], class_index(row["label"], AG_NEWS_LABEL_WORDS, where))
            for row in split_rows(splits, split, HUB_ID)
        ]

    return DatasetBundle(
        name="ag_news", task=_ag_news_task(), train=rows("train"), test=rows("test"), source=f"hub {HUB_ID}"
    )
