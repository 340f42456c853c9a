"""What a client does with a train or evaluate message, apart from Flower's process model.

The ClientApp (aflora.flower.client_app) runs these in its own process, or hands them to a long-lived client
worker (aflora.flower.client_worker) that keeps the base model loaded across messages. Either way the inputs
are plain records: the message's content, what the client kept between rounds, its node config and run id.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from ..config import config_from_tree
from ..logs import configure_logging, quiet_flower
from ..runtime.client import ClientRuntime
from ..secure_aggregation import fold_upload
from .client_app import client_id_of
from .records import arrays_to_tensors, read_instruction, secure_upload_content, tensors_to_arrays, upload_content
from .secagg_client import is_secure_round

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _runtime(run_id: int, experiment_json: str, client_id: int, data_file: str, state_dir: str) -> ClientRuntime:
    configure_logging()
    quiet_flower(verbose=False)
    config = config_from_tree(json.loads(experiment_json))
    runtime = ClientRuntime(config, client_id=client_id, data_file=Path(data_file) if data_file else None,
                            state_dir=Path(state_dir) if state_dir else None)
    log.info("run %d: client runtime built, %s loaded", run_id, config.model.name)
    return runtime


def client_runtime(experiment_json: str, node_config: dict, run_id: int) -> ClientRuntime:
    """Built on a run's first message and reused for the rest of that run: the model loads once per process
    (per run, in a client worker). A SuperNode given `data-file` in its node config reads only that file (see
    aflora.shards), and with `state-dir` keeps the global updates it received across its processes; otherwise
    (simulation) every process derives the partitions from the experiment config and finds updates in the
    run's shared store."""
    data_file = str(node_config.get("data-file", ""))
    state_dir = str(node_config.get("state-dir", ""))
    return _runtime(run_id, experiment_json, client_id_of(node_config) if data_file else -1, data_file, state_dir)


def train(content: RecordDict, kept: ArrayRecord | None, node_config: dict, run_id: int) -> tuple[RecordDict, ArrayRecord | None]:
    """The reply's content, and what the client keeps for its next round (None: nothing)."""
    instruction, sync, experiment = read_instruction(content)
    if instruction.client_id != client_id_of(node_config):
        raise RuntimeError(f"message for client {instruction.client_id} reached client {client_id_of(node_config)}")
    runtime = client_runtime(experiment, node_config, run_id)
    upload = runtime.train(instruction, sync, arrays_to_tensors(kept) if kept else None)
    keep = tensors_to_arrays(upload.local_state) if upload.local_state else None
    if is_secure_round(content):  # SecAgg+ masks the weighted, padded B'; the rest goes in the clear
        summands, clear = fold_upload(runtime.side.method, instruction, upload, runtime.config.secagg.clipping_range)
        return secure_upload_content(clear, summands), keep
    return upload_content(upload), keep


def evaluate(content: RecordDict, kept: ArrayRecord | None, node_config: dict, run_id: int) -> RecordDict:
    """Personalized evaluation: the client's own model on its local test rows."""
    instruction, sync, experiment = read_instruction(content)
    metrics = client_runtime(experiment, node_config, run_id).evaluate(
        instruction, sync, arrays_to_tensors(kept) if kept else None)
    return RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})})
