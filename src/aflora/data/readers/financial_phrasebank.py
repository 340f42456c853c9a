"""Financial PhraseBank: sentiment sentences by annotator-agreement level; an evaluation set here."""

from __future__ import annotations

from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import class_index, hub_splits, split_rows
from aflora.data.tasks import SENTIMENT_LABEL_WORDS, sentiment_task
from aflora.errors import DataError

HUB_ID = "takala/financial_phrasebank"
FPB_AGREEMENT_LEVELS = ("50", "66", "75", "All")
FPB_LABELS = {"negative": 0, "neutral": 1, "positive": 2}  # = sentiment_task's label order


def _fpb_agreement(options: dict) -> str:
    agree = str(options.get("fpb_agree", "50")).strip()
    for level in FPB_AGREEMENT_LEVELS:
        if agree.lower() == level.lower():
            return level
    raise DataError(
        f"fpb_agree={agree!r} is not an annotator-agreement level of Financial PhraseBank; "
        f"expected one of {', '.join(FPB_AGREEMENT_LEVELS)} (file Sentences_<level>Agree.txt)."
    )


def _read_fpb_sentences(path: Path) -> list[dict]:
    """``sentence@label`` lines in latin-1; the label follows the *last* '@' (sentences may contain '@')."""
    if not path.is_file():
        raise DataError(
            f"no Financial PhraseBank file at {str(path)!r}; expected Sentences_<50|66|75|All>Agree.txt "
            f"(latin-1, one 'sentence@label' per line). Check --data-dir or the fpb_agree option."
        )
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        sentence, separator, label = line.rpartition("@")
        if not separator or label.strip() not in FPB_LABELS:
            raise DataError(
                f"{path} line {line_number} is not 'sentence@label' with label in {', '.join(FPB_LABELS)}: "
                f"{line[:80]!r}."
            )
        rows.append({"text": sentence.strip(), "label": FPB_LABELS[label.strip()]})
    return rows


def _fpb_bundle(rows: list[dict], source: str) -> DatasetBundle:
    # FPB is an evaluation set in this project; train = test keeps it usable as either side
    return DatasetBundle(name="financial_phrasebank", task=sentiment_task(), train=rows, test=rows, source=source)


def load_local(folder: Path, options: dict) -> DatasetBundle:
    path = folder / f"Sentences_{_fpb_agreement(options)}Agree.txt"
    return _fpb_bundle(_read_fpb_sentences(path), source=f"local {path}")


def load_hub(options: dict) -> DatasetBundle:
    config = f"sentences_{_fpb_agreement(options).lower()}agree"
    splits = hub_splits(HUB_ID, config)
    rows = [
        {"text": row["sentence"], "label": class_index(row["label"], SENTIMENT_LABEL_WORDS, HUB_ID)}
        for row in split_rows(splits, "train", HUB_ID)
    ]
    return _fpb_bundle(rows, source=f"hub {HUB_ID} ({config})")
