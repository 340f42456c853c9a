"""One federated round, top to bottom: the loop every engine drives.

    run_round(server, transport, round_)
      1. instructions out    server.instructions: each sampled client's instruction + the base merges it lacks,
                             built as the transport sends it (the server keeps a receipt to check the reply)
      2. replies in          transport.train (or train_secure under SecAgg+): uploads and failed clients
      3. accept / reject     server.accept: checks each reply against its instruction; too few usable aborts
      4. aggregate, server step, merge    server.complete_round: the method's math, the base model's update
      5. clients' own evaluation          transport.evaluate: personalized models on local test rows
      6. central evaluation  server.evaluate: the global model on the test rows (and extra benchmarks)
      7. the round's record  a RoundRecord, returned (with the accepted uploads and the server's diagnostics)

    run_rounds(...)  round 0 (the base model, when starting), then run_round for each round, appending each
                     record to the RunRecord and calling on_round_end (the checkpoint) after it; last, the final
                     evaluation on data.final_eval_size test rows (results.json's final accuracy and its interval)

The server's half is aflora.runtime.server, the method's math aflora.methods. How messages reach clients
is a `Transport`: `InProcessTransport` below (one ClientRuntime in this process: tests, quick checks) or
aflora.flower.transport.FlowerTransport (Flower's Grid: simulation and deployment). Nothing here imports
Flower; a round's outcome is what `run_round` returns, never state left on an object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .base_sync import BaseSync
from .methods import Instruction, Upload
from .results import RoundRecord, RunRecord, accuracy_interval, round_record
from .runtime.client import ClientRuntime
from .runtime.server import Outbox, ServerRuntime
from .secure_aggregation import SecureSum, fold_upload

log = logging.getLogger(__name__)


@dataclass
class TrainReplies:
    """What came back from a round's train messages, before the server has checked any of it."""

    uploads: list[Upload] = field(default_factory=list)  # the readable replies (under SecAgg+: their clear parts)
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"client", "reason"}: crashed, dropped out, unreadable
    summed: list[Any] | None = None  # SecAgg+: the unmasked Σ p_k·pad(B'_k), one array per module in summand_order
    summed_clients: list[int] = field(default_factory=list)  # ... and the clients whose vectors it holds


class Transport(Protocol):
    """How a round's messages reach the clients and their replies come back. An Outbox builds each message as it
    is taken: a transport takes them no faster than it sends them."""

    def train(self, round_: int, messages: Outbox) -> TrainReplies: ...

    def train_secure(self, round_: int, messages: Outbox) -> TrainReplies:
        """As `train`, through secure aggregation: the summed factors arrive only as their sum."""
        ...

    def evaluate(self, round_: int, messages: Outbox) -> list[tuple[int, dict[str, float]]]:
        """(client id, its metrics incl. num_examples) for every client that answered."""
        ...


@dataclass
class RoundResult:
    record: RoundRecord  # what results.json keeps of the round
    uploads: list[Upload]  # the accepted replies the round aggregated
    diagnostics: dict[str, float]  # the server's, as complete_round returned them


# ---------------------------------------------------------------------------- the loop
def run_rounds(server: ServerRuntime, transport: Transport, record: RunRecord, first_round: int, last_round: int,
               on_round_end: Callable[[int], None] | None = None) -> None:
    """Rounds first_round..last_round into `record`. A fresh run (first_round 1) first scores the base model
    (record.initial); a resumed run starts after its checkpoint's round."""
    if first_round == 1:
        metrics, eval_seconds = evaluate_globally(server, 0)
        record.initial = dict(metrics, eval_seconds=eval_seconds, accuracy_ci95=accuracy_interval(metrics))
    for round_ in range(first_round, last_round + 1):
        record.rounds.append(run_round(server, transport, round_).record)
        if on_round_end is not None:
            on_round_end(round_)
    record.final_eval = evaluate_finally(server)


def run_round(server: ServerRuntime, transport: Transport, round_: int) -> RoundResult:
    started = time.perf_counter()
    messages = server.instructions(round_)
    log.info("round %d: training clients %s", round_, messages.client_ids)
    replies = transport.train_secure(round_, messages) if server.secure else transport.train(round_, messages)
    failures = list(replies.failures)
    accepted = server.accept(round_, replies.uploads, failures)  # appends each rejection and missing reply to failures
    secure_sum = SecureSum.from_arrays(server.method, replies.summed, replies.summed_clients) if server.secure else None
    diagnostics = server.complete_round(round_, accepted, secure_sum)
    round_seconds = time.perf_counter() - started  # instructions out -> global update merged
    personalized = evaluate_on_clients(server, transport, round_, [upload.client_id for upload in accepted])
    metrics, eval_seconds = evaluate_globally(server, round_)
    record = round_record(round_, accepted, metrics, round_seconds=round_seconds, eval_seconds=eval_seconds, failures=failures,
                          server=diagnostics, personalized=personalized,
                          instruction_bytes=server.instruction_bytes)  # as built when sent: rebuilding now would see the new state
    return RoundResult(record, accepted, diagnostics)


def evaluate_on_clients(server: ServerRuntime, transport: Transport, round_: int, client_ids: list[int]) -> dict[str, float]:
    """Personalized evaluation (data.local_test_fraction > 0): this round's clients score their own models
    (e.g. FedSA-LoRA's shared A with their personal B) on their local test rows; the example-weighted mean."""
    messages = server.evaluation_messages(round_, client_ids)
    results = transport.evaluate(round_, messages) if messages else []
    for client_id, _ in results:
        server.acknowledge(client_id)  # it answered: its base model holds every merge sent with the message
    return weighted_means([metrics for _, metrics in results])


def evaluate_globally(server: ServerRuntime, round_: int) -> tuple[dict[str, float], float]:
    """The global model on the server's test rows: (metrics, seconds it took)."""
    started = time.perf_counter()
    metrics = server.evaluate()
    eval_seconds = time.perf_counter() - started
    log.info("round %d: %s (evaluated in %.1fs)", round_, format_metrics(metrics), eval_seconds)
    return metrics, eval_seconds


def evaluate_finally(server: ServerRuntime) -> dict[str, Any]:
    """Once, after the last round: the global model on data.final_eval_size test rows (often more than per round)."""
    started = time.perf_counter()
    final = server.evaluate_final()
    final["eval_seconds"] = time.perf_counter() - started
    scores = f"loss {final['loss']:.4f}"
    if final["accuracy"] is not None:
        low, high = final["accuracy_ci95"]
        scores = f"accuracy {final['accuracy']:.4f} (95 % interval {low:.4f}–{high:.4f}), {scores}"
    log.info("final evaluation on %d of %d test rows: %s (%.1fs)", final["rows"], final["test_rows"], scores, final["eval_seconds"])
    return final


def weighted_means(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric weighted by each result's num_examples (plus the total count)."""
    total = sum(r["num_examples"] for r in results)
    if not total:
        return {}
    keys = sorted({k for r in results for k in r} - {"num_examples"})
    means = {k: sum(r[k] * r["num_examples"] for r in results) / total for k in keys}
    return {**means, "num_examples": float(total), "clients": float(len(results))}


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


# ---------------------------------------------------------------------------- clients in this process
class InProcessTransport:
    """Every client in this process: one ClientRuntime trains whichever client a message names (one shared
    base model, as in a simulation worker). What a client keeps between rounds (FedSA-LoRA's personal B) is
    held here per client, as Flower keeps it in the node's Context. A client that raises has failed, as over
    Flower: the round records it and goes on."""

    def __init__(self, client: ClientRuntime) -> None:
        self.client = client
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def train(self, round_: int, messages: Outbox) -> TrainReplies:
        replies = TrainReplies()
        for instruction, sync in messages:
            try:
                replies.uploads.append(self.train_one(instruction, sync))
            except Exception as err:  # noqa: BLE001 - any client crash is that client's failure
                replies.failures.append(client_failure(round_, instruction, err))
        return replies

    def train_secure(self, round_: int, messages: Outbox) -> TrainReplies:
        """SecAgg+ without the cryptography: each client folds its weights into its summands exactly as over
        Flower (aflora.secure_aggregation.fold_upload); they are added here in float64, unquantized and unmasked."""
        replies = TrainReplies()
        method, clipping_range = self.client.side.method, self.client.config.secagg.clipping_range
        for instruction, sync in messages:
            try:
                summands, clear = fold_upload(method, instruction, self.train_one(instruction, sync), clipping_range)
            except Exception as err:  # noqa: BLE001 - any client crash is that client's failure
                replies.failures.append(client_failure(round_, instruction, err))
                continue
            summands = [t.double() for t in summands]
            replies.summed = summands if replies.summed is None else [a + t for a, t in zip(replies.summed, summands)]
            replies.summed_clients.append(instruction.client_id)
            replies.uploads.append(clear)
        return replies

    def evaluate(self, round_: int, messages: Outbox) -> list[tuple[int, dict[str, float]]]:
        results = []
        for instruction, sync in messages:
            try:
                metrics = self.client.evaluate(instruction, sync, self.kept.get(instruction.client_id))
            except Exception as err:  # noqa: BLE001 - a client that cannot evaluate is left out of the mean
                client_failure(round_, instruction, err)
                continue
            results.append((instruction.client_id, {k: float(v) for k, v in metrics.items()}))
        return results

    def train_one(self, instruction: Instruction, sync: BaseSync) -> Upload:
        upload = self.client.train(instruction, sync, self.kept.get(instruction.client_id))
        if upload.local_state:
            self.kept[instruction.client_id] = upload.local_state
        return upload


def client_failure(round_: int, instruction: Instruction, err: Exception) -> dict[str, Any]:
    log.warning("round %d: client %d failed: %s", round_, instruction.client_id, err, exc_info=err)
    return {"client": instruction.client_id, "reason": f"client error: {type(err).__name__}: {err}"}
