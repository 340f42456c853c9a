"""SecAgg+ around a round's train messages: Flower's own workflow and client mod, unchanged.

Flower 1.41 and 1.42 ship SecAgg+ for their legacy API only:
- `SecAggPlusWorkflow.__call__` (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py) requires a
  `LegacyContext`. Its setup stage samples clients through the legacy `Strategy.configure_fit(round,
  Parameters, ClientManager)` and keeps `fitins_to_recorddict(FitIns)` as each client's train message; its
  unmask stage passes the dequantized result to `Strategy.aggregate_fit` as every survivor's
  `FitRes.parameters`, with the survivors' FitRes metrics beside it.
- `secaggplus_mod` (flwr/client/mod/secure_aggregation/secaggplus_mod.py) reads the ClientApp's reply as a
  legacy FitRes (`fitres.parameters`, `fitres.num_examples`, `fitres.metrics`), multiplies the parameters by
  num_examples / max_weight, quantizes and masks them, and empties every ArrayRecord of the reply.
- The workflow divides the unmasked sum by the survivors' total num_examples: it returns a weighted MEAN.

So the bridge is small, and the cryptography stays Flower's: the workflow runs in a LegacyContext around a
collector strategy that "samples" the nodes the round's messages go to and receives the result; after the
setup stage our own instruction messages replace the legacy FitIns placeholders; clients reply in FitRes
layout with num_examples = 1 and max_weight = 1 (their per-module weights are folded in already, which
SecAgg+'s single scalar weight per client cannot express), so the result is the mean over the survivors
and their number times it is the sum. Everything in the clear travels in FitRes.metrics.
The client side (the mod) is aflora.flower.secagg_client, kept light for the ClientApp process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from ..config import SECAGG_MODULUS, SecAggSection

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- server side
@dataclass
class SecureRound:
    """One round of SecAgg+: the sum (None when the protocol stopped), the clear parts, who is missing and why."""

    summed: list[np.ndarray] | None
    replies: dict[int, dict] = field(default_factory=dict)  # node id -> clear part of its reply (FitRes.metrics)
    errors: dict[int, str] = field(default_factory=dict)  # node id -> its first error or missed reply


def secure_train_round(grid: Grid, messages: list[Message], round_: int, options: SecAggSection,
                       timeout: float | None) -> SecureRound:
    """Run SecAgg+'s four stages (setup, share keys, collect masked vectors, unmask) with `messages` as the
    train messages of the collect stage; returns the unmasked SUM over the clients whose vectors arrived."""
    recording = _RecordingGrid(grid)
    collector = _SumCollector(recording, [m.metadata.dst_node_id for m in messages])
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=collector)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _MethodSecAggPlus(
        {m.metadata.dst_node_id: m.content for m in messages},
        num_shares=flower_count(options.num_shares),
        reconstruction_threshold=flower_count(options.reconstruction_threshold),
        max_weight=1.0,
        clipping_range=options.clipping_range,
        quantization_range=options.quantization_range,
        modulus_range=SECAGG_MODULUS,
        timeout=timeout,
    )
    workflow(recording, context)
    if collector.mean is None:
        return SecureRound(None, {}, recording.errors)
    survivors = len(collector.replies)
    return SecureRound([array * survivors for array in collector.mean], collector.replies, recording.errors)


def flower_count(value: float) -> int | float:
    """Flower reads a float as a fraction and an int as a count; the config holds both as floats (≤ 1: fraction)."""
    return float(value) if value <= 1 else int(value)


class _MethodSecAggPlus(SecAggPlusWorkflow):
    """SecAggPlusWorkflow whose collect stage sends the method's own instructions instead of legacy FitIns."""

    def __init__(self, contents: dict[int, RecordDict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.contents = contents

    def setup_stage(self, grid, context, state) -> bool:
        proceed = super().setup_stage(grid, context, state)
        state.nid_to_fitins = dict(self.contents)  # read in the collect-masked-vectors stage only
        return proceed


class _SumCollector(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow calls: samples the given nodes, keeps what unmasking yields."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self.grid, self.node_ids = grid, node_ids
        self.mean: list[np.ndarray] | None = None
        self.replies: dict[int, dict] = {}

    def configure_fit(self, server_round, parameters, client_manager):
        placeholder = FitIns(parameters, {})  # replaced by the method's instruction after the setup stage
        return [(GridClientProxy(node_id, self.grid, 0), placeholder) for node_id in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)  # the same aggregate in every FitRes
            self.replies = {proxy.node_id: dict(fitres.metrics) for proxy, fitres in results}
        return None, {}  # the workflow then leaves its own context alone

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _RecordingGrid:
    """The run's Grid, noting per node the first error or missing reply (SecAggPlusWorkflow keeps only the
    errors, not who sent them), so a round's failures name their clients."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_error():
                self.errors.setdefault(reply.metadata.src_node_id, reply.error.reason)
        answered = {reply.metadata.src_node_id for reply in replies}
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self.errors.setdefault(message.metadata.dst_node_id, "no reply (timed out or unreachable)")
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)
