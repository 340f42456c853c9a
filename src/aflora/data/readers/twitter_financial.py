"""Twitter Financial News Sentiment (TFNS): labels remapped to the shared sentiment order."""

from __future__ import annotations

from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import as_int, hub_splits, require_columns, split_rows
from aflora.data.sources import read_table
from aflora.data.tasks import sentiment_task
from aflora.errors import DataError

HUB_ID = "zeroshot/twitter-financial-news-sentiment"
TFNS_TO_SENTIMENT = {0: 0, 1: 2, 2: 1}  # Bearish -> negative, Bullish -> positive, Neutral -> neutral


def _tfns_row(text: str, tfns_label, where: str) -> dict:
    label = as_int(tfns_label, where)
    if label not in TFNS_TO_SENTIMENT:
        raise DataError(f"{where}: TFNS label {tfns_label!r} is not 0 (Bearish), 1 (Bullish) or 2 (Neutral).")
    return {"text": text, "label": TFNS_TO_SENTIMENT[label]}


def _read_tfns(path: Path) -> list[dict]:
    table = read_table(path)
    require_columns(table, ["text", "label"], str(path))
    return [_tfns_row(row["text"], row["label"], f"{path} row {line}") for line, row in enumerate(table, start=1)]


def load_local(folder: Path, options: dict) -> DatasetBundle:
    return DatasetBundle(
        name="twitter_financial_news_sentiment",
        task=sentiment_task(),
        train=_read_tfns(folder / "sent_train.csv"),
        test=_read_tfns(folder / "sent_valid.csv"),
        source=f"local {folder}: train = sent_train.csv, test = sent_valid.csv",
    )


def load_hub(options: dict) -> DatasetBundle:
    splits = hub_splits(HUB_ID)

    def rows(split: str) -> list[dict]:
        where = f"{HUB_ID} {split}"
        return [_tfns_row(row["text"], row["label"], where) for row in split_rows(splits, split, HUB_ID)]

    return DatasetBundle(
        name="twitter_financial_news_sentiment",
        task=sentiment_task(),
        train=rows("train"),
        test=rows("validation"),
        source=f"hub {HUB_ID} (train / validation)",
    )
