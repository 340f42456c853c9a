"""A Flower Strategy that lets a federated method drive the rounds.

It sends each client its own message (rank, mask, A slice: whatever the method's `instruct`
returns), and hands the heterogeneous replies to the server runtime. No method math lives here.
With `secagg.enabled` the same messages go out through Flower's SecAgg+ (aflora.flower.secagg), and the
runtime receives the clear parts of the replies plus the unmasked sum of the rest.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..errors import RoundAborted
from ..results import RunRecord, round_record
from ..runtime.server import ServerRuntime
from ..secure_aggregation import SecureSum
from .records import instruction_content, read_secure_upload, read_upload
from .secagg import SecureRound, secure_train_round

log = logging.getLogger(__name__)

IDENTIFY = "query.identify"


def identify_clients(grid: Grid, num_clients: int, *, timeout_seconds: float) -> dict[int, int]:
    """Ask every connected node which client (data partition) it is: client id -> node id."""
    deadline = time.monotonic() + timeout_seconds
    next_notice = time.monotonic()
    node_of_client: dict[int, int] = {}
    while len(node_of_client) < num_clients:
        unknown = [n for n in grid.get_node_ids() if n not in node_of_client.values()]
        messages = [Message(content=RecordDict(), dst_node_id=n, message_type=IDENTIFY) for n in unknown]
        for reply in grid.send_and_receive(messages, timeout=60) if messages else []:
            if reply.has_error():
                continue
            client_id = int(reply.content.config_records["identity"]["client_id"])
            if client_id in node_of_client:
                raise RuntimeError(f"two nodes claim to be client {client_id}; give every SuperNode its own partition-id")
            if not 0 <= client_id < num_clients:
                raise RuntimeError(f"a node says it is client {client_id}, but clients are numbered 0..{num_clients - 1}")
            node_of_client[client_id] = reply.metadata.src_node_id
        missing = sorted(set(range(num_clients)) - set(node_of_client))
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"clients {missing} never connected within {timeout_seconds:.0f}s ({len(node_of_client)} of {num_clients} did). "
                "Start one SuperNode per client (partition-id 0..K-1); in simulation set num-supernodes to "
                "federation.num_clients (flwr run . --federation-config \"num-supernodes=K\")."
            )
        if time.monotonic() >= next_notice:
            log.info("waiting for clients %s to connect (%d of %d connected)", missing, len(node_of_client), num_clients)
            next_notice = time.monotonic() + 10.0
        time.sleep(1.0)
    return node_of_client


def send_in_waves(grid: Grid, messages: Iterable[Message], max_in_flight: int, timeout: float) -> list[Message]:
    """Every message's reply (or error), at most `max_in_flight` messages out at once (0 = all at once); each
    wave is built only when it is sent. The round's timeout is one deadline for all the waves."""
    deadline = time.monotonic() + timeout
    pending, replies = iter(messages), []
    while wave := list(itertools.islice(pending, max_in_flight or None)):
        replies.extend(grid.send_and_receive(wave, timeout=max(deadline - time.monotonic(), 0.0)))
    return replies


class MethodStrategy(Strategy):
    def __init__(self, runtime: ServerRuntime, record: RunRecord, experiment: dict, on_round_end=None, max_in_flight: int = 0) -> None:
        self.runtime = runtime
        self.max_in_flight = max_in_flight  # train messages out at once (0 = all)
        self.record = record
        self.experiment = experiment
        self.on_round_end = on_round_end  # e.g. write a checkpoint
        self.node_of_client: dict[int, int] = {}
        self._round_started = 0.0
        self._round_seconds = 0.0
        self._uploads = []
        self._personalized: dict[str, float] = {}

    def run_rounds(self, grid: Grid, first_round: int, last_round: int) -> None:
        """Flower's round loop (train, per-client evaluate, central evaluate) from any round, so a resumed
        run continues where its checkpoint ended."""
        timeout = self.runtime.config.engine.round_timeout
        if first_round == 1:
            self.evaluate_fn(0, ArrayRecord())
        for server_round in range(first_round, last_round + 1):
            messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
            if self.runtime.secure:  # SecAgg+'s stages need every participant at once
                summed = secure_train_round(grid, list(messages), server_round, self.runtime.config.secagg, timeout)
                self.aggregate_secure_train(server_round, summed)
            else:
                self.aggregate_train(server_round, send_in_waves(grid, messages, self.max_in_flight, timeout))
            evaluations = list(self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
            self.aggregate_evaluate(server_round, grid.send_and_receive(evaluations, timeout=timeout) if evaluations else [])
            self.evaluate_fn(server_round, ArrayRecord())
            if self.on_round_end is not None:
                self.on_round_end(server_round)

    def summary(self) -> None:
        config = self.runtime.config
        log.info("method %s, %d clients, ranks %s", config.method, config.federation.num_clients, config.federation.client_ranks)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.node_of_client:
            config = self.runtime.config
            self.node_of_client = identify_clients(grid, config.federation.num_clients, timeout_seconds=config.engine.connect_timeout)
        self._round_started = time.perf_counter()
        pairs = self.runtime.instructions(server_round)
        log.info("round %d: training clients %s", server_round, [instruction.client_id for instruction, _ in pairs])
        # Built as they are sent (send_in_waves): a message holds copies of its instruction's tensors.
        return (Message(content=instruction_content(instruction, sync, self.experiment),
                        dst_node_id=self.node_of_client[instruction.client_id], message_type="train")
                for instruction, sync in pairs)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        client_of_node = {node: cid for cid, node in self.node_of_client.items()}
        uploads, failures = [], []
        for reply in replies:
            client = client_of_node.get(reply.metadata.src_node_id)
            if reply.has_error():
                failures.append({"client": client, "reason": f"client error: {reply.error.reason}"})
                log.warning("round %d: client %s failed: %s", server_round, client, reply.error.reason)
                continue
            try:
                uploads.append(read_upload(reply.content))
            except (KeyError, ValueError, TypeError) as err:  # a reply we cannot even read
                failures.append({"client": client, "reason": f"rejected: unreadable reply ({type(err).__name__}: {err})"})
                log.warning("round %d: unreadable reply from client %s: %s", server_round, client, err)
        accepted = self.runtime.accept(server_round, uploads, failures)
        return self._finish_train(server_round, accepted, failures, self.runtime.complete_round(server_round, accepted))

    def aggregate_secure_train(self, server_round: int, result: SecureRound) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A SecAgg+ round: the clear parts of the replies go through the usual checks, the sum to the method."""
        client_of_node = {node: cid for cid, node in self.node_of_client.items()}
        failures = [{"client": client_of_node.get(node), "reason": f"dropped out of SecAgg+ (not in the sum): {reason}"}
                    for node, reason in sorted(result.errors.items()) if node not in result.replies]
        for failure in failures:
            log.warning("round %d: client %s %s", server_round, failure["client"], failure["reason"])
        if result.summed is None:
            reasons = "; ".join(f"client {f['client']}: {f['reason']}" for f in failures) or "see Flower's log"
            raise RoundAborted(f"round {server_round}: SecAgg+ stopped before unmasking, too few clients stayed for "
                               f"secagg.reconstruction_threshold ({reasons})")
        uploads = []
        for node, fields in sorted(result.replies.items()):
            try:
                uploads.append(read_secure_upload(fields))
            except (KeyError, ValueError, TypeError) as err:  # then `complete_round` drops the round: it is in the sum
                failures.append({"client": client_of_node.get(node), "reason": f"rejected: unreadable reply ({type(err).__name__}: {err})"})
        accepted = self.runtime.accept(server_round, uploads, failures)
        summed = SecureSum.from_arrays(self.runtime.method, result.summed, [client_of_node[node] for node in result.replies])
        return self._finish_train(server_round, accepted, failures, self.runtime.complete_round(server_round, accepted, summed))

    def _finish_train(self, server_round: int, accepted: list, failures: list[dict], diagnostics: dict[str, float]):
        self._server_diagnostics = diagnostics
        self._round_seconds = time.perf_counter() - self._round_started
        self._uploads, self._failures = accepted, failures
        return None, MetricRecord({"clients": len(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Personalized evaluation: this round's clients score their own models on their local test rows.
        (The global model is evaluated centrally, on the server: evaluate_fn.)"""
        clients = [u.client_id for u in self._uploads]
        return [
            Message(content=instruction_content(instruction, sync, self.experiment),
                    dst_node_id=self.node_of_client[instruction.client_id], message_type="evaluate")
            for instruction, sync in self.runtime.evaluation_messages(server_round, clients)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' own-model metrics."""
        client_of_node = {node: cid for cid, node in self.node_of_client.items()}
        replies = [r for r in replies if not r.has_error()]
        for reply in replies:
            self.runtime.acknowledge(client_of_node[reply.metadata.src_node_id])
        results = [dict(r.content.metric_records["metrics"]) for r in replies]
        self._personalized = weighted_means(results)
        return MetricRecord(self._personalized) if self._personalized else None

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        metrics = self.runtime.evaluate()
        eval_seconds = time.perf_counter() - started
        if server_round == 0:
            self.record.initial = dict(metrics, eval_seconds=eval_seconds)
        else:
            self.record.rounds.append(round_record(server_round, self._uploads, metrics, round_seconds=self._round_seconds,
                                                   eval_seconds=eval_seconds, failures=self._failures,
                                                   server=self._server_diagnostics, personalized=self._personalized))
        log.info("round %d: %s (evaluated in %.1fs)", server_round, _format_metrics(metrics), eval_seconds)
        return MetricRecord({k: float(v) for k, v in metrics.items()})


def weighted_means(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric weighted by each result's num_examples (plus the total count)."""
    total = sum(r["num_examples"] for r in results)
    if not total:
        return {}
    keys = sorted({k for r in results for k in r} - {"num_examples"})
    means = {k: sum(r[k] * r["num_examples"] for r in results) / total for k in keys}
    return {**means, "num_examples": float(total), "clients": float(len(results))}


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
