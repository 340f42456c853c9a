"""MMLU: 4-choice questions per subject; train = the dev rows, test = the test rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import class_index, hub_splits, require_columns, split_rows
from aflora.data.sources import read_table
from aflora.data.tasks import format_multiple_choice, multiple_choice_task
from aflora.errors import DataError

HUB_ID = "cais/mmlu"
MMLU_CHOICE_COLUMNS = ["choice0", "choice1", "choice2", "choice3"]


def _mmlu_row(question: str, choices: Sequence[str], answer, subject: str, where: str) -> dict:
    return {
        "text": format_multiple_choice(question, choices),
        "label": class_index(answer, ("A", "B", "C", "D"), where),
        "subject": subject,
    }


def _wanted_subjects(options: dict, available: Iterable[str]) -> list[str]:
    available = sorted(set(available))
    wanted = options.get("mmlu_subjects")  # a list: the registry coerces "a,b" as it does every list option
    if wanted is None:
        return available
    unknown = sorted(set(wanted) - set(available))
    if unknown or not wanted:
        raise DataError(
            f"mmlu_subjects names unknown subject(s) {', '.join(unknown) or '(none given)'}; "
            f"available: {', '.join(available)}."
        )
    return sorted(set(wanted))


def _read_mmlu_split(split_dir: Path, options: dict) -> list[dict]:
    """All ``<subject>_<split>.csv`` files (header question,choice0..3,answer with answer 0-3)."""
    files = {path.stem.rsplit("_", 1)[0]: path for path in split_dir.glob("*.csv")}
    if not files:
        raise DataError(f"no <subject>_{split_dir.name}.csv files in {split_dir}; see the mmlu folder's SOURCE.md.")
    rows = []
    for subject in _wanted_subjects(options, files):
        table = read_table(files[subject])
        require_columns(table, ["question", *MMLU_CHOICE_COLUMNS, "answer"], str(files[subject]))
        for line, row in enumerate(table, start=1):
            choices = [row[column] for column in MMLU_CHOICE_COLUMNS]
            rows.append(_mmlu_row(row["question"], choices, row["answer"], subject, f"{files[subject]} row {line}"))
    return rows


def load_local(folder: Path, options: dict) -> DatasetBundle:
    return DatasetBundle(
        name="mmlu",
        task=multiple_choice_task(),
        train=_read_mmlu_split(folder / "dev", options),
        test=_read_mmlu_split(folder / "test", options),
        source=f"local {folder}: train = dev/*.csv, test = test/*.csv",
    )


def load_hub(options: dict) -> DatasetBundle:
    splits = hub_splits(HUB_ID, "all")

    def rows(split: str) -> list[dict]:
        hub_rows = split_rows(splits, split, HUB_ID)
        subjects = set(_wanted_subjects(options, (row["subject"] for row in hub_rows)))
        return [
            _mmlu_row(row["question"], row["choices"], row["answer"], row["subject"], f"{HUB_ID} {split}")
            for row in hub_rows
            if row["subject"] in subjects
        ]

    return DatasetBundle(
        name="mmlu",
        task=multiple_choice_task(),
        train=rows("dev"),
        test=rows("test"),
        source=f"hub {HUB_ID} (all)",
    )
