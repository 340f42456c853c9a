"""Dolly-15k: instruction following, from the FLoRA client split, the full file or the hub."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from aflora.data.bundle import DatasetBundle
from aflora.data.readers.common import hub_splits, split_rows
from aflora.data.sources import read_table
from aflora.data.tasks import instruction_task
from aflora.errors import DataError

HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_FIELDS = ("instruction", "context", "response", "category")
DOLLY_SPLIT_FOLDER = "flora_split_10clients"
DOLLY_FULL_FILE = "databricks-dolly-15k.jsonl.gz"


def _dolly_row(row: dict, where: str) -> dict:
    missing = [name for name in DOLLY_FIELDS if name not in row]
    if missing:
        raise DataError(
            f"{where}: a Dolly record lacks {', '.join(missing)}; expected fields {', '.join(DOLLY_FIELDS)}."
        )
    return {name: str(row[name] or "") for name in DOLLY_FIELDS}


def _read_dolly(path: Path) -> list[dict]:
    return [_dolly_row(row, f"{path} row {line}") for line, row in enumerate(read_table(path), start=1)]


def _client_files(split_dir: Path) -> list[Path]:
    """local_training_0.json, local_training_1.json, ... in client order (numeric, not lexical)."""
    numbered = ((path.stem.rsplit("_", 1)[1], path) for path in split_dir.glob("local_training_*.json"))
    files = {int(number): path for number, path in numbered if number.isdigit()}
    if not files or sorted(files) != list(range(len(files))):
        raise DataError(
            f"{split_dir} should hold local_training_0.json ... local_training_<n-1>.json; "
            f"found client numbers {sorted(files)}. Restore the missing files."
        )
    return [files[client] for client in range(len(files))]


def _dolly_presplit(split_dir: Path) -> DatasetBundle:
    train: list[dict] = []
    clients: list[list[int]] = []
    for path in _client_files(split_dir):
        rows = _read_dolly(path)
        clients.append(list(range(len(train), len(train) + len(rows))))
        train.extend(rows)
    test = _read_dolly(split_dir / "global_test.json")
    return DatasetBundle(
        name="dolly",
        task=instruction_task(),
        train=train,
        test=test,
        source=f"local {split_dir}: train = local_training_0..{len(clients) - 1}.json (FLoRA split), "
        "test = global_test.json",
        extra_eval={"heldout": test},
        presplit_clients=clients,
    )


def hold_out_per_category(rows: list[dict], *, per_category: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): ``per_category`` random rows of every category go to test, like FedIT/FLoRA's global test."""
    by_category: dict[str, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_category[row["category"]].append(position)
    rng = random.Random(seed)
    held_out: set[int] = set()
    for category in sorted(by_category):
        positions = by_category[category]
        if len(positions) <= per_category:
            raise DataError(
                f"category {category!r} has only {len(positions)} rows, cannot hold out {per_category} for testing "
                f"and keep some for training. Lower holdout_per_category."
            )
        held_out.update(rng.sample(positions, per_category))
    train = [row for position, row in enumerate(rows) if position not in held_out]
    test = [row for position, row in enumerate(rows) if position in held_out]
    return train, test


def _dolly_unsplit(rows: list[dict], options: dict, source: str) -> DatasetBundle:
    per_category = int(options.get("holdout_per_category", 10))
    train, test = hold_out_per_category(rows, per_category=per_category, seed=int(options.get("holdout_seed", 42)))
    return DatasetBundle(
        name="dolly",
        task=instruction_task(),
        train=train,
        test=test,
        source=f"{source} ({per_category} rows per category held out as test)",
        extra_eval={"heldout": test},
    )


def load_local(folder: Path, options: dict) -> DatasetBundle:
    split_dir = folder / DOLLY_SPLIT_FOLDER
    if split_dir.is_dir():
        return _dolly_presplit(split_dir)
    full_file = folder / DOLLY_FULL_FILE
    if not full_file.is_file():
        raise DataError(
            f"{folder} holds neither {DOLLY_SPLIT_FOLDER}/ (the FLoRA client split) nor {DOLLY_FULL_FILE}; "
            f"put one of them there (see the data folder's SOURCE.md)."
        )
    return _dolly_unsplit(_read_dolly(full_file), options, source=f"local {full_file}")


def load_hub(options: dict) -> DatasetBundle:
    splits = hub_splits(HUB_ID)
    rows = [_dolly_row(row, HUB_ID) for row in split_rows(splits, "train", HUB_ID)]
    return _dolly_unsplit(rows, options, source=f"hub {HUB_ID}")
