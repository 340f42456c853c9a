"""Flower ClientApp: decode the server's message, let the client runtime train, encode the upload.

In simulation every ClientApp in a worker process shares that process's ClientRuntime (one base
model); in deployment each SuperNode runs one and loads only its own partition's rows.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import config_from_tree
from ..logs import configure_logging, quiet_flower
from ..runtime.client import ClientRuntime
from ..secure_aggregation import fold_upload
from .records import arrays_to_tensors, read_instruction, secure_upload_content, tensors_to_arrays, upload_content
from .secagg import is_secure_round, secure_aggregation_mod

app = ClientApp()


@functools.lru_cache(maxsize=1)
def _runtime(experiment_json: str, client_id: int, data_file: str, state_dir: str) -> ClientRuntime:
    configure_logging()
    quiet_flower(verbose=False)
    config = config_from_tree(json.loads(experiment_json))
    return ClientRuntime(config, client_id=client_id, data_file=Path(data_file) if data_file else None,
                         state_dir=Path(state_dir) if state_dir else None)


def client_runtime(experiment_json: str, context: Context) -> ClientRuntime:
    """Built on the first message of a run and reused: the model loads once per process. A SuperNode given
    `data-file` in its node config reads only that file (see aflora.shards), and with `state-dir` keeps the
    global updates it received across its processes; otherwise (simulation) every process derives the
    partitions from the experiment config and finds updates in the run's shared store."""
    data_file = str(context.node_config.get("data-file", ""))
    state_dir = str(context.node_config.get("state-dir", ""))
    return _runtime(experiment_json, client_id_of(context) if data_file else -1, data_file, state_dir)


def client_id_of(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise RuntimeError(
            "this SuperNode has no partition-id; start it with --node-config \"partition-id=<k> num-partitions=<K>\""
        ) from None


@app.query("identify")
def identify(message: Message, context: Context) -> Message:
    content = RecordDict({"identity": ConfigRecord({"client_id": client_id_of(context)})})
    return Message(content=content, reply_to=message)


LOCAL_STATE = "aflora.local_state"


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    instruction, sync, experiment = read_instruction(message.content)
    if instruction.client_id != client_id_of(context):
        raise RuntimeError(f"message for client {instruction.client_id} reached client {client_id_of(context)}")
    # What the client keeps between rounds lives in Flower's per-node Context, not in a worker process:
    # in simulation the next round may run in another worker.
    kept = context.state.array_records.get(LOCAL_STATE)
    runtime = client_runtime(experiment, context)
    upload = runtime.train(instruction, sync, arrays_to_tensors(kept) if kept else None)
    if upload.local_state:
        context.state[LOCAL_STATE] = tensors_to_arrays(upload.local_state)
    if is_secure_round(message.content):  # SecAgg+ masks the weighted, padded B'; the rest goes in the clear
        summands, clear = fold_upload(runtime.side.method, instruction, upload, runtime.config.secagg.clipping_range)
        return Message(content=secure_upload_content(clear, summands), reply_to=message)
    return Message(content=upload_content(upload), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Personalized evaluation: the client's own model on its local test rows."""
    instruction, sync, experiment = read_instruction(message.content)
    kept = context.state.array_records.get(LOCAL_STATE)
    metrics = client_runtime(experiment, context).evaluate(instruction, sync, arrays_to_tensors(kept) if kept else None)
    return Message(content=RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})}), reply_to=message)
