"""What both ends of a federated run build from one config, independent of the FL engine.

- `workload`: data → public split → client partitions (deterministic: every process agrees); `preflight`.
- `model_side`: one process's shared base model, adapter host, encoder and method.
- `client`: `ClientRuntime`, one per process; trains whichever client a message names.
- `server`: `ServerRuntime`, the server's half of every round (instruct, accept, aggregate, server step,
  merge, evaluate).

Keeping the base models in step is aflora.base_sync; the order of a round is aflora.rounds. Flower's
ServerApp/ClientApp (aflora.flower) only move messages between the two halves: nothing here imports Flower.
"""

from .client import ClientRuntime
from .model_side import ModelSide, autocast_dtype
from .server import ServerRuntime
from .workload import Workload, hold_out_local_tests, node_workload, preflight, prepare_workload, sample_rows

__all__ = [
    "ClientRuntime", "ModelSide", "ServerRuntime", "Workload", "autocast_dtype", "hold_out_local_tests", "node_workload",
    "preflight", "prepare_workload", "sample_rows",
]
