"""Per-client data files for real deployments: each SuperNode reads only its own rows.

`aflora partition` writes, for one experiment config, `client_<k>.jsonl` (client k's records, each tagged
with `_split` = "train" or "test" for its local test rows), `task.json` (how records become prompts) and
`manifest.json` (what produced the files). A SuperNode started with
`--node-config "partition-id=<k> data-file=<dir>/client_<k>.jsonl"` then trains on that file alone; the
server keeps the public set and the global test rows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .config import ExperimentConfig
from .data import DataError, Task

TASK_FILE = "task.json"
MANIFEST_FILE = "manifest.json"
SPLIT = "_split"


def shard_path(folder: Path, client_id: int) -> Path:
    return folder / f"client_{client_id}.jsonl"


def write_shards(config: ExperimentConfig, folder: Path) -> list[Path]:
    """One file per client, from the same deterministic partition a simulation of this config uses."""
    from .runtime import prepare_workload  # the runtime imports this module for reading shards

    workload = prepare_workload(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TASK_FILE).write_text(json.dumps(dataclasses.asdict(workload.bundle.task), indent=2))
    paths = []
    for cid, (train, test) in enumerate(zip(workload.client_rows, workload.client_test_rows)):
        path = shard_path(folder, cid)
        with path.open("w") as handle:
            for split, rows in (("train", train), ("test", test)):
                for index in rows:
                    handle.write(json.dumps({**workload.bundle.train[index], SPLIT: split}) + "\n")
        paths.append(path)
    manifest = {
        "dataset": workload.bundle.name,
        "source": workload.bundle.source,
        "seed": config.seed,
        "partition": config.data.partition,
        "clients": {str(cid): {"train": len(tr), "test": len(te)} for cid, (tr, te) in enumerate(zip(workload.client_rows, workload.client_test_rows))},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return paths


def read_shard(path: Path) -> tuple[Task, list[dict], list[dict]]:
    """(task, train records, local test records) of one client's file."""
    path = Path(path)
    task_file = path.parent / TASK_FILE
    if not path.is_file() or not task_file.is_file():
        raise DataError(f"data-file {path} (and {TASK_FILE} beside it) must exist; create them with `aflora partition`")
    task = Task(**{k: tuple(v) if k == "label_words" else v for k, v in json.loads(task_file.read_text()).items()})
    train, test = [], []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            (test if record.pop(SPLIT, "train") == "test" else train).append(record)
    if not train:
        raise DataError(f"data-file {path} has no training rows")
    return task, train, test
