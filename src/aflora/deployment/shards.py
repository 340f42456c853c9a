"""`aflora partition`: one data file per client, from the same deterministic partition a simulation uses.

The format and its reader are in aflora/shards.py (the runtime reads shards); writing needs the runtime's
partition (`prepare_workload`), so it lives here, above the runtime.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import ExperimentConfig
from ..runtime.workload import prepare_workload
from ..shards import MANIFEST_FILE, SPLIT, TASK_FILE, shard_path


def write_shards(config: ExperimentConfig, folder: Path) -> list[Path]:
    """One file per client, from the same deterministic partition a simulation of this config uses."""
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
        "clients": {str(cid): {"train": len(tr), "test": len(te)}
                    for cid, (tr, te) in enumerate(zip(workload.client_rows, workload.client_test_rows))},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return paths
