"""A checkpoint after every round, and resuming from it.

What a round changes on the server is all that is saved: the method's server state (everything its
`init_server_state` and rounds created: global factors, masks, ranks...), the low-rank updates merged
into the base model so far (a resumed server and fresh clients replay them, in order), the random
number generators, and the record of the rounds. Randomness inside rounds is seeded by (seed, round,
client), so a resumed run continues bit-identically. What clients keep themselves (FedSA-LoRA's
personal B) lives on the clients and is not part of a server checkpoint.

A checkpoint is one file, written to a temporary name and renamed: a kill never leaves half a checkpoint
(record.json beside it is a readable copy of the record, not read back).
They are pickles (torch.save): load only checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .results import RunRecord

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
RECORD_FILE = "record.json"


def method_state(method: Any, constructed: set[str]) -> dict[str, Any]:
    """The attributes the method acquired after construction: its server state."""
    return {key: value for key, value in vars(method).items() if key not in constructed}


def save_checkpoint(out_dir: Path, round_: int, runtime: Any, record: RunRecord) -> Path:
    folder = Path(out_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "round": round_,
        "method": method_state(runtime.method, runtime.constructed_keys),
        "merges": runtime.merges.by_round,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "privacy_releases": list(runtime.privacy.releases) if runtime.privacy is not None else [],
        "record": record.to_json(),  # in the same file: state and record of different rounds cannot mix
    }
    _atomic(folder / STATE_FILE, lambda path: torch.save(state, path))
    _atomic(folder / RECORD_FILE, lambda path: path.write_text(json.dumps(record.to_json(), indent=2)))
    return folder


def load_checkpoint(out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(server state, record as saved) of the last completed round in `out_dir`."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no checkpoint; --resume takes the --out folder of a run that finished at least one round")
    state = torch.load(folder / STATE_FILE, weights_only=False)  # our own pickle (see the module doc)
    record = state["record"]
    if record["rounds"] and record["rounds"][-1]["round"] != state["round"]:
        raise ValueError(f"checkpoint in {folder} is inconsistent: state of round {state['round']}, record up to round "
                         f"{record['rounds'][-1]['round']}")
    return state, record


def restore(runtime: Any, state: dict[str, Any]) -> int:
    """Put a fresh server runtime back where the checkpoint left it; returns the last completed round."""
    vars(runtime.method).update(state["method"])
    for round_, update in sorted(state["merges"].items()):
        runtime.merges.by_round[round_] = update
        runtime.side.host.merge_into_base(update)  # the same additions in the same order: the same weights
    if runtime.privacy is not None:
        runtime.privacy.replay(state.get("privacy_releases", []))
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return int(state["round"])


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
