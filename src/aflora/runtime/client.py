"""The client's half of a round: bring the base model up to date, train the named client, upload.

One `ClientRuntime` per process serves every client whose message arrives there, on one shared base model.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from ..base_sync import BaseSync, MergeStore
from ..config import ExperimentConfig
from ..encoding import Encoded
from ..lora.host import backward_fraction
from ..methods import Instruction, Upload
from ..methods.base import hash_seed
from ..privacy import clip_upload
from ..training import OptimConfig
from .model_side import ModelSide
from .workload import node_workload, prepare_workload

log = logging.getLogger(__name__)


class ClientRuntime:
    """One per process; serves every client whose message arrives here, on one shared base model."""

    def __init__(self, config: ExperimentConfig, *, client_id: int | None = None, data_file: Path | None = None,
                 state_dir: Path | None = None) -> None:
        """In simulation every process derives all partitions; a deployed node passes its own `data_file`
        and a `state_dir` that outlives its processes (the round updates it has received)."""
        self.config = config
        self.workload = node_workload(config, client_id, data_file) if data_file else prepare_workload(config)
        self.side = ModelSide(self.workload)
        self.applied_rounds: set[int] = set()
        self.node_store = MergeStore(Path(state_dir) / "merges") if state_dir else None
        self._encoded: dict[int, list[Encoded]] = {}

    def client_examples(self, client_id: int) -> list[Encoded]:
        if client_id not in self._encoded:
            rows = [self.workload.bundle.train[i] for i in self.workload.client_rows[client_id]]
            if not rows:
                raise ValueError(f"client {client_id} has no training data")
            self._encoded[client_id] = self.side.encode(rows)
        return self._encoded[client_id]

    def evaluate(self, instruction: Instruction, sync: BaseSync, local_state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The client's own model (e.g. FedSA-LoRA's shared A with its personal B) on its local test rows."""
        self.sync_base(sync)
        rows = [self.workload.bundle.train[i] for i in self.workload.client_test_rows[instruction.client_id]]
        if not rows:
            raise ValueError(f"client {instruction.client_id} has no local test rows; set data.local_test_fraction > 0")
        examples = self.side.encode(rows, self.side.scoring_objective)
        return self.side.evaluate(examples, self.side.method.client_model(instruction, local_state))

    def sync_base(self, sync: BaseSync) -> None:
        """Apply, in order, every merged round this process's base model lacks.

        An update comes from the message, from this node's state-dir (a deployed SuperNode may start a
        fresh process for every message) or from the run's shared store (simulation workers). A round
        found nowhere is an error: training on an incomplete base would be silently wrong."""
        for round_, adapter in sync.merges.items():
            if self.node_store is not None and round_ not in self.applied_rounds:
                self.node_store.save(round_, adapter)
        stores = [store for store in (self.node_store, MergeStore(Path(sync.store)) if sync.store else None) if store]
        for round_ in sorted(sync.merged_rounds):
            if round_ in self.applied_rounds:
                continue
            adapter = sync.merges.get(round_) or next((a for st in stores if (a := st.load(round_)) is not None), None)
            if adapter is None:
                raise RuntimeError(
                    f"this client's base model lacks the global update of round {round_} (it has rounds "
                    f"{sorted(self.applied_rounds)}); give the SuperNode a persistent --node-config state-dir=<folder>"
                )
            self.side.merge(adapter)
            self.applied_rounds.add(round_)

    def train(self, instruction: Instruction, sync: BaseSync, local_state: dict[str, torch.Tensor] | None = None) -> Upload:
        """One client's round; `local_state` is what the client kept last time (the engine stores it per client)."""
        fault = injected_fault(self.config, instruction.client_id, instruction.round)
        if fault == TIMEOUT:  # answer only after the server stopped waiting (engine.round_timeout after it sent at the latest)
            time.sleep(self.config.engine.round_timeout)
        if fault:
            raise RuntimeError(f"client {instruction.client_id}: injected fault ({fault}) in round {instruction.round}")
        self.sync_base(sync)
        examples = self.client_examples(instruction.client_id)
        spec = self.side.method.local_job(instruction, local_state)
        train = self.config.train
        progress = StepProgress(f"round {instruction.round} client {instruction.client_id}", train.local_steps)
        result = self.side.train(
            spec,
            examples,
            steps=train.local_steps,
            batch_size=train.batch_size,
            optim=OptimConfig(lr=train.lr, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm),
            seed=hash_seed(self.config.seed, instruction.round, instruction.client_id, 7),
            on_step=progress,
        )
        upload = self.side.method.upload(instruction, result.adapter, len(examples))
        if self.config.privacy.clip_norm:
            upload.metrics["update_norm"] = clip_upload(upload.tensors, self.config.privacy.clip_norm)
        upload.trained_params = spec.trained_params()
        upload.metrics.update(train_loss=result.mean_loss, train_seconds=result.seconds, train_tokens=float(result.tokens),
                              backward_fraction=backward_fraction(spec.adapter, self.side.host.footprint().num_blocks))
        mean_rank = sum(upload.ranks.values()) / max(len(upload.ranks), 1)
        log.info("%s: rank %.1f, %d steps, loss %s, %.1fs", progress.label, mean_rank, result.steps, progress.summary(), result.seconds)
        return upload


TIMEOUT = "engine.timeout_probability: stalled past the round's timeout"


def injected_fault(config: ExperimentConfig, client_id: int, round_: int) -> str | None:
    """The fault the engine's fault injection gives this client in this round, if any (for rehearsals and tests).
    Drawn from (seed, round, client) alone: a resumed run injects the same faults, whichever process trains."""
    engine = config.engine
    if client_id in engine.fail_clients and round_ >= engine.fail_from_round:
        return "engine.fail_clients"
    draw = random.Random(hash_seed(config.seed, round_, client_id, 17)).random()
    if draw < engine.crash_probability:
        return "engine.crash_probability"
    if draw < engine.crash_probability + engine.timeout_probability:
        return TIMEOUT
    return None


class StepProgress:
    """Per-step losses; a progress line every quarter of a long local run, a one-line summary at the end."""

    def __init__(self, label: str, steps: int) -> None:
        self.label, self.steps, self.losses = label, steps, []
        self.every = max(1, steps // 4) if steps >= 20 else 0

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if self.every and step % self.every == 0 and step < self.steps:
            log.info("%s: step %d/%d, loss %.4f", self.label, step, self.steps, loss)

    def summary(self) -> str:
        if not self.losses:
            return "-"
        return f"{self.losses[0]:.3f} → {self.losses[-1]:.3f}" if len(self.losses) > 1 else f"{self.losses[0]:.3f}"

