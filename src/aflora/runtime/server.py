"""The server's half of a round: instruct → accept → aggregate → server step → merge → evaluate.

`ServerRuntime` holds the method's global state and answers each step of a round; the order of the
steps is aflora.rounds (`run_round`), which the engines drive.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import torch

from ..base_sync import BaseMerges, BaseSync, MergeStore
from ..config import ExperimentConfig, clients_per_round
from ..costs import payload_bytes
from ..encoding import Encoded, PromptEncoder
from ..errors import RoundAborted
from ..evaluation import ClassificationOutcomes
from ..lora.factors import Adapter, adapter_tensors
from ..methods import Instruction, TrainSpec, Upload
from ..methods.base import hash_seed, validate_upload
from ..privacy import PrivacyLedger, clip_upload, noise_std
from ..results import final_eval_record
from ..secure_aggregation import SecureSum, attach_weights, error_bound, validate_clear_upload
from ..training import OptimConfig
from .model_side import ModelSide
from .workload import EvalSet, Workload, prepare_workload

log = logging.getLogger(__name__)

ClientMessage = tuple[Instruction, BaseSync]  # what a client receives: its instruction and the base merges it lacks


class Outbox:
    """A round's messages, one per sampled client, each built only when a transport takes it.

    An instruction holds copies of global tensors (AFLoRA: A's rows for the client's rank, 2.2 MB at rank 16 on
    SmolLM2): built all at once, every sampled client's would be in memory for the whole round. A transport that
    sends a few at a time (aflora.flower.transport.send_bounded) holds only those few."""

    def __init__(self, client_ids: list[int], build: Callable[[int], ClientMessage]) -> None:
        self.client_ids = client_ids
        self._build = build

    def __len__(self) -> int:
        return len(self.client_ids)

    def __iter__(self) -> Iterator[ClientMessage]:
        return map(self._build, self.client_ids)


class ServerRuntime:
    """The server's half of every round and the global model's evaluation; aflora.rounds puts the steps in order."""

    def __init__(self, config: ExperimentConfig, workload: Workload | None = None) -> None:
        self.config = config
        self.workload = workload or prepare_workload(config)
        self.side = ModelSide(self.workload)
        self.method = self.side.method
        self.constructed_keys = set(vars(self.method))  # what init_server_state and rounds add is the state to checkpoint
        self.method.init_server_state()
        privacy = config.privacy
        self.privacy: PrivacyLedger | None = None
        if privacy.clip_norm:
            self.method.use_uniform_weights()
            self.privacy = PrivacyLedger(noise_multiplier=privacy.noise_multiplier, delta=privacy.delta,
                                         population=config.federation.num_clients, sampled=config.federation.sample_fraction < 1)
        # SecAgg+ (aflora.secure_aggregation): clients fold in the weights sent with their instructions
        self.secure = config.secagg.enabled
        self.secure_weights: dict[int, dict[str, float]] = {}
        self.sampled: list[int] = []  # this round's clients
        # Of each instruction sent this round, what its reply is checked against (method.receipt: no A, no B)
        self.sent: dict[int, Instruction] = {}
        self.instruction_bytes: dict[int, int] = {}  # of each instruction sent this round, as built (the fleet clock's downlink)
        self.merges = BaseMerges()
        self.merge_store: MergeStore | None = None  # set by the engine when clients share the server's disk
        self._pending_ack: dict[int, int] = {}
        # The last merged round each client confirmed holding (by a successful reply): it gets every later one.
        self.acknowledged: dict[int, int] = {c.client_id: 0 for c in self.side.clients}
        # The per-round rows' outcomes under the current global model (None once a round changes it): the final
        # evaluation of those same rows (data.final_eval_size = "eval_size") takes them instead of scoring again.
        self.scored_now: ClassificationOutcomes | None = None

    @cached_property
    def test_examples(self) -> list[Encoded]:
        return self.side.encode(self.workload.test_rows, self.side.scoring_objective)

    @cached_property
    def public_examples(self) -> list[Encoded]:
        source = self.workload.public_source
        rows = [source.train[i] for i in self.workload.public_rows]
        if self.workload.public_bundle is None:
            return self.side.encode(rows)
        encoder = PromptEncoder(self.side.tokenizer, source.task, self.config.data.max_length)
        return [encoder.encode_lm(row) for row in rows]

    def sample_clients(self, round_: int) -> list[int]:
        fed = self.config.federation
        return sorted(random.Random(hash_seed(self.config.seed, round_, 3)).sample(range(fed.num_clients), clients_per_round(fed)))

    def instructions(self, round_: int) -> Outbox:
        """Each sampled client's instruction and the base-model merges it has not received yet, built as they are
        taken; the server keeps each one's receipt in `sent`."""
        self.sampled, self.sent, self.instruction_bytes = self.sample_clients(round_), {}, {}
        if self.secure:  # the server will see only the weighted sum: each client learns its weights up front
            self.secure_weights = self.method.secure_weights(self.sampled)

        def build(client_id: int) -> ClientMessage:
            instruction = self.method.instruct(client_id, round_)
            if self.secure:
                attach_weights(instruction, self.secure_weights[client_id])
            self.sent[client_id] = self.method.receipt(instruction)
            self.instruction_bytes[client_id] = payload_bytes(instruction.tensors)
            return instruction, self.base_sync(client_id)

        return Outbox(self.sampled, build)

    def server_trainer(self, round_: int):
        server = self.config.server
        if server.steps == 0 or not self.workload.public_rows:
            return None

        def train_on_public(spec: TrainSpec) -> Adapter:
            result = self.side.train(
                spec,
                self.public_examples,
                steps=server.steps,
                batch_size=server.batch_size,
                optim=OptimConfig(lr=server.lr, max_grad_norm=self.config.train.max_grad_norm),
                seed=hash_seed(self.config.seed, round_, 5),
                objective=self.workload.public_objective,
            )
            log.info("round %d server step on %d public rows: loss %.4f, %.1fs",
                     round_, len(self.public_examples), result.mean_loss, result.seconds)
            return result.adapter

        return train_on_public

    def accept(self, round_: int, uploads: list[Upload], failures: list[dict]) -> list[Upload]:
        """The replies fit to aggregate; every other sampled client gets a failure entry with its reason.

        Weights are then computed over the accepted replies only (every method normalises over what it
        aggregates). Fewer than federation.min_replies accepted replies abort the round: nothing is
        aggregated and the checkpoint of the previous round stays as it was."""
        accepted: dict[int, Upload] = {}
        for upload in uploads:
            instruction = self.sent.get(upload.client_id)
            if upload.client_id in accepted:
                reason = "a second reply from this client in the same round"
            elif instruction is None:
                reason = "this client was not asked to train this round"
            else:
                reason = (validate_clear_upload if self.secure else validate_upload)(self.method, upload, instruction)
            if reason:
                failures.append({"client": upload.client_id, "reason": f"rejected: {reason}"})
                log.warning("round %d: reply of client %d rejected: %s", round_, upload.client_id, reason)
            else:
                if self.privacy is not None:  # enforce the bound even if a client skipped its clipping
                    clip_upload(upload.tensors, self.config.privacy.clip_norm)
                accepted[upload.client_id] = upload
                self.acknowledge(upload.client_id)
        explained = {f.get("client") for f in failures}
        for cid in sorted(set(self.sampled) - set(accepted) - explained):
            failures.append({"client": cid, "reason": "no reply (the client crashed, timed out or was unreachable)"})
        minimum = self.config.federation.min_replies
        if len(accepted) < minimum:
            reasons = "; ".join(f"client {f['client']}: {f['reason']}" for f in failures)
            raise RoundAborted(
                f"round {round_}: {len(accepted)} of {len(self.sampled)} clients replied usably, fewer than "
                f"federation.min_replies = {minimum} ({reasons})"
            )
        return [accepted[cid] for cid in sorted(accepted)]

    def complete_round(self, round_: int, uploads: list[Upload], secure_sum: SecureSum | None = None) -> dict[str, float]:
        """Aggregate the accepted uploads, run the server's own update, merge the round's update into the base.
        With secure aggregation the uploads are clear parts only and `secure_sum` holds their weighted sum.

        Returns the server's diagnostics: aggregation and server-step seconds, the merged update's bytes,
        aggregation error, and the method's own (truncation loss, A's change in the server step)."""
        started = time.perf_counter()
        self.scored_now = None
        if self.secure:
            self.aggregate_secure(round_, uploads, secure_sum)
        else:
            self.method.aggregate(uploads, round_)
        dp = self.add_privacy_noise(round_, len(uploads)) if self.privacy is not None else {}
        aggregated = time.perf_counter()
        self.method.server_update(self.server_trainer(round_))
        update = self.method.round_merge()
        merge_bytes = 0
        if update is not None:
            merge_bytes = payload_bytes(adapter_tensors(update))
            self.merges.by_round[round_] = update
            self.side.merge(update)
            if self.merge_store is not None:
                self.merge_store.save(round_, update)
        diagnostics = {"aggregation_seconds": aggregated - started, "server_seconds": time.perf_counter() - aggregated,
                       "merge_bytes": merge_bytes, **dp}
        error = self.method.aggregation_error()
        if error is not None:
            diagnostics["aggregation_error"] = error
        return {**diagnostics, **self.method.round_diagnostics()}

    def aggregate_secure(self, round_: int, uploads: list[Upload], secure_sum: SecureSum | None) -> None:
        if secure_sum is None:
            raise RuntimeError("secagg.enabled = true needs an engine that runs SecAgg+ (aflora run, flwr run)")
        rejected = sorted(set(secure_sum.client_ids) - {u.client_id for u in uploads})
        if rejected:  # their masked B' is inside the sum, and a masked contribution cannot be taken back out
            raise RoundAborted(
                f"round {round_}: the SecAgg+ sum holds the contributions of clients {rejected}, whose clear-text "
                "replies were rejected (see the warnings above); the sum cannot be separated, so the round is dropped"
            )
        secagg = self.config.secagg
        clipped = {u.client_id: int(u.metrics["secagg_clipped"]) for u in uploads if u.metrics.get("secagg_clipped")}
        if clipped:
            log.warning("round %d: SecAgg+ clipped weighted B' entries to ±%g (client: entries %s), so the aggregate is off by "
                        "more than the quantization error there: raise secagg.clipping_range", round_, secagg.clipping_range, clipped)
        self.method.aggregate_secure(secure_sum.vectors, uploads, self.secure_weights, round_)
        weight_total = min(sum(self.secure_weights[u.client_id][m] for u in uploads) for m in self.method.module_shapes)
        log.info("round %d: secure sum of %d clients; every entry of B_global within %.2g of plain aggregation", round_, len(uploads),
                 error_bound(len(uploads), secagg.clipping_range, secagg.quantization_range, weight_total))

    def add_privacy_noise(self, round_: int, num_clients: int) -> dict[str, float]:
        """The Gaussian mechanism on the aggregate (aflora.privacy); seeded by round, so resumes stay identical."""
        privacy = self.config.privacy
        std = noise_std(privacy.noise_multiplier, privacy.clip_norm, num_clients)
        self.method.add_aggregate_noise(std, torch.Generator().manual_seed(hash_seed(self.config.seed, round_, 13)))
        return {"dp_noise_std": std, "dp_epsilon": self.privacy.release(num_clients)}

    @cached_property
    def extra_eval_sets(self) -> dict[str, tuple[PromptEncoder, list[Encoded]]]:
        """Other benchmarks scored each round (e.g. MMLU for a Dolly-trained model)."""
        sets = {}
        for name, bundle in self.workload.extra_eval.items():
            encoder = PromptEncoder(self.side.tokenizer, bundle.task, self.config.data.max_length)
            sets[name] = (encoder, [encoder.encode_classification(row) for row in bundle.test])
        return sets

    def evaluate(self) -> dict[str, float]:
        """The global model on the test rows (accuracy and loss, or LM loss), plus every extra benchmark."""
        adapter = self.method.global_adapter()
        if self.side.encoder.label_token_ids:
            self.scored_now = self.side.score_rows(self.test_examples, adapter, self.side.encoder)
            metrics = self.scored_now.metrics()
        else:
            metrics = self.side.evaluate(self.test_examples, adapter)
        for name, (encoder, examples) in self.extra_eval_sets.items():
            extra = self.side.evaluate(examples, adapter, encoder)
            metrics.update({f"{name}/accuracy": extra["accuracy"], f"{name}/loss": extra["loss"]})
        return metrics

    def evaluate_final(self) -> dict[str, Any]:
        """The global model on the final evaluation's rows (data.final_eval_size) of the task and of every extra
        benchmark: scores, Wilson intervals and each row right or wrong (results.json's final_eval)."""
        adapter = self.method.global_adapter()
        final_test = self.workload.final_test
        if self.scored_now is not None and final_test.rows == self.workload.test_rows:
            final = final_eval_record(final_test.indices, final_test.rows, final_test.available, self.scored_now.metrics(),
                                      self.scored_now.correct)
        else:
            final = self.score_final(final_test, self.side.encoder, adapter)
        final["extra"] = {name: self.score_final(eval_set, self.extra_eval_sets[name][0], adapter)
                          for name, eval_set in self.workload.final_extra.items()}
        return final

    def score_final(self, eval_set: EvalSet, encoder: PromptEncoder, adapter: Adapter | None) -> dict[str, Any]:
        if not encoder.label_token_ids:  # instruction tasks: the LM loss, no rows to pair
            examples = [encoder.encode_lm(row) for row in eval_set.rows]
            return final_eval_record(eval_set.indices, eval_set.rows, eval_set.available, self.side.evaluate(examples, adapter), None)
        outcomes = self.side.score_rows([encoder.encode_classification(row) for row in eval_set.rows], adapter, encoder)
        return final_eval_record(eval_set.indices, eval_set.rows, eval_set.available, outcomes.metrics(), outcomes.correct)

    def evaluation_messages(self, round_: int, client_ids: list[int]) -> Outbox:
        """For personalized evaluation: what each client needs to assemble its current model, built as taken."""
        if not self.config.data.local_test_fraction:
            client_ids = []
        return Outbox(client_ids, lambda cid: (self.method.evaluation_instruction(cid, round_), self.base_sync(cid)))

    def base_sync(self, client_id: int) -> BaseSync:
        self._pending_ack[client_id] = max(self.merges.by_round, default=0)
        return BaseSync(
            merges=self.merges.since(self.acknowledged[client_id]),
            merged_rounds=sorted(self.merges.by_round),
            store=str(self.merge_store.folder) if self.merge_store else "",
        )

    def acknowledge(self, client_id: int) -> None:
        """A successful reply: the client's base holds every update sent with that message."""
        self.acknowledged[client_id] = self._pending_ack.get(client_id, self.acknowledged[client_id])
