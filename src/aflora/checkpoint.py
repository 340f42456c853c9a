"""A checkpoint after every round, and resuming from it.

What a round changes on the server is all that is saved: the method's server state (everything its
`init_server_state` and rounds created: global factors, masks, ranks...), the low-rank updates merged
into the base model so far (a resumed server and fresh clients replay them, in order), the random
number generators, and the record of the rounds. Randomness inside rounds is seeded by (seed, round,
client), so a resumed run continues bit-identically. What clients keep themselves (FedSA-LoRA's
personal B) lives on the clients and is not part of a server checkpoint.

In checkpoint/: `round_<t>.pt` (one file per checkpoint, written to a temporary name and renamed: a kill
never leaves half a checkpoint under its name), `manifest.json` (each kept checkpoint's round, size and
sha256, written last) and record.json (a readable copy of the record, not read back). A new checkpoint is
read back and its checksum verified before the manifest names it; only then is the one before the
previous deleted, so the last two good checkpoints are always on disk. Loading verifies the checksum: a
truncated or altered file is refused with an error naming the previous, intact checkpoint, which
`aflora run --resume <run>/checkpoint/round_<t>.pt` continues from.
They are pickles (torch.save): load only checkpoints you wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .results import RunRecord
from .run_folder import CHECKPOINT_DIR

MANIFEST_FILE = "manifest.json"
RECORD_FILE = "record.json"
LEGACY_STATE_FILE = "state.pt"  # the single, unchecked checkpoint file of aflora before checksums
KEPT = 2  # the latest checkpoint and the one before it


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
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    entry = {"round": round_, "file": f"round_{round_}.pt", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _atomic(folder / entry["file"], lambda path: _write_synced(path, data))
    problem = damage(folder, entry)
    if problem:  # the disk did not keep what was written: keep pointing at the checkpoints that are good
        raise CheckpointError(f"the checkpoint of round {round_} ({folder / entry['file']}) {problem} right after it was written; "
                              "the previous checkpoint is kept. Check the disk (space, errors) and resume the run")
    older = [e for e in _manifest_entries(folder) if e["round"] < round_][: KEPT - 1]
    kept = [entry, *older]
    _atomic(folder / MANIFEST_FILE, lambda path: _write_synced(path, json.dumps({"checkpoints": kept}, indent=2).encode()))
    for stale in {*folder.glob("round_*.pt"), folder / LEGACY_STATE_FILE} - {folder / e["file"] for e in kept}:
        stale.unlink(missing_ok=True)
    _atomic(folder / RECORD_FILE, lambda path: path.write_text(json.dumps(record.to_json(), indent=2)))
    return folder


def load_checkpoint(out_dir: Path, file: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(server state, record as saved) of the last completed round in `out_dir`, or of the checkpoint `file`
    (a name in its checkpoint/ folder), after verifying its checksum."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    entries = _manifest_entries(folder)
    if not entries:
        if file is None and (folder / LEGACY_STATE_FILE).is_file():  # written before checksums: nothing to verify against
            return _consistent(folder, _read(folder / LEGACY_STATE_FILE))
        raise FileNotFoundError(f"{folder} holds no checkpoint; --resume takes the --out folder of a run that finished at least one round")
    entry = entries[0] if file is None else next((e for e in entries if e["file"] == file), None)
    if entry is None:
        raise CheckpointError(f"{folder / str(file)} is not a checkpoint listed in {folder / MANIFEST_FILE}; the checkpoints "
                              f"there are {', '.join(str(folder / e['file']) for e in entries)}")
    problem = damage(folder, entry)
    if problem:
        intact = next((e for e in entries if e is not entry and not damage(folder, e)), None)
        way_out = (f"The checkpoint of round {intact['round']} is intact: continue from it with "
                   f"`aflora run --resume {folder / intact['file']}`" if intact else
                   "No intact checkpoint is left: start the run again (aflora run --overwrite)")
        raise CheckpointError(f"the checkpoint of round {entry['round']} ({folder / entry['file']}) {problem}; it is left "
                              f"as it is. {way_out}")
    return _consistent(folder, _read(folder / entry["file"]))


def damage(folder: Path, entry: dict[str, Any]) -> str:
    """What is wrong with a checkpoint file against its manifest entry ('' when nothing)."""
    path = folder / entry["file"]
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (f"is truncated: {size} of the {entry['bytes']} bytes written" if size < entry["bytes"] else
                f"has {size} bytes where {entry['bytes']} were written")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        return f"is corrupted: its sha256 is {digest[:12]}…, {entry['sha256'][:12]}… was written"
    return ""


def _manifest_entries(folder: Path) -> list[dict[str, Any]]:
    """The kept checkpoints, latest first ([] without a manifest)."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text())["checkpoints"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}), so no checkpoint in {folder} can be verified; "
                              "start the run again (aflora run --overwrite)") from None


def _read(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=False)  # our own pickle (see the module doc)
    except Exception as error:  # noqa: BLE001 - any unreadable pickle is a damaged checkpoint
        raise CheckpointError(f"the checkpoint {path} cannot be read ({type(error).__name__}: {error})") from None


def _consistent(folder: Path, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    record = state["record"]
    if record["rounds"] and record["rounds"][-1]["round"] != state["round"]:
        raise CheckpointError(f"checkpoint in {folder} is inconsistent: state of round {state['round']}, record up to round "
                              f"{record['rounds'][-1]['round']}")
    return state, record


def restore(runtime: Any, state: dict[str, Any]) -> int:
    """Put a fresh server runtime back where the checkpoint left it; returns the last completed round."""
    vars(runtime.method).update(state["method"])
    for round_, update in sorted(state["merges"].items()):
        runtime.merges.by_round[round_] = update
        runtime.side.merge(update)  # the same additions in the same order: the same weights
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


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the manifest names it


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
