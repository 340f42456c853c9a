"""Per-client data files for real deployments: the file format, and how a SuperNode reads its own rows.

`aflora partition` (deployment/shards.py) writes, for one experiment config, `client_<k>.jsonl` (client k's
records, each tagged with `_split` = "train" or "test" for its local test rows), `task.json` (how records become
prompts) and `manifest.json` (what produced the files). A SuperNode started with
`--node-config "partition-id=<k> data-file=<dir>/client_<k>.jsonl"` then trains on that file alone
(:func:`read_shard`); the server keeps the public set and the global test rows. Writing needs the runtime's
partition and reading is part of the runtime, so the two live on different floors: no import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import DataError, Task

TASK_FILE = "task.json"
MANIFEST_FILE = "manifest.json"
SPLIT = "_split"


def shard_path(folder: Path, client_id: int) -> Path:
    return folder / f"client_{client_id}.jsonl"


def read_shard(path: Path) -> tuple[Task, list[dict], list[dict]]:
    """(task, train records, local test records) of one client's file."""
    path = Path(path)
    task_file = path.parent / TASK_FILE
    if not path.is_file() or not task_file.is_file():
        raise DataError(f"data-file {path} (and {TASK_FILE} beside it) must exist; create them with `aflora partition`")
    task = Task(**{k: tuple(v) if k == "label_words" else v for k, v in json.loads(task_file.read_text()).items()})
    train, test = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (test if record.pop(SPLIT, "train") == "test" else train).append(record)
    if not train:
        raise DataError(f"data-file {path} has no training rows")
    return task, train, test
