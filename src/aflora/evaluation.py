"""Evaluating the global model: accuracy by label-word scoring, and held-out language-model loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import MIN_SHARED_PREFIX, Encoded, evaluation_batches, evaluation_order, shared_prefix
from .lora.factors import Adapter
from .lora.host import AdapterHost
from .training import PrefixCache, autocast_context, class_logits, lm_loss


@dataclass
class ClassificationOutcomes:
    """Per test row, in the order given: whether the label word scored highest, and its cross-entropy."""

    correct: list[bool]
    loss: list[float]

    def metrics(self) -> dict[str, float]:
        n = max(len(self.correct), 1)
        return {"accuracy": sum(self.correct) / n, "loss": sum(self.loss) / n, "num_examples": len(self.correct)}


def score_classification(
    host: AdapterHost,
    examples: Sequence[Encoded],
    *,
    label_token_ids: Sequence[int],
    batch_size: int,
    pad_id: int,
    adapter: Adapter | None = None,
    autocast_dtype: torch.dtype | None = None,
    reuse_prefix: bool = True,
) -> ClassificationOutcomes:
    """Correct = argmax over the label words' logits; loss = cross-entropy over those logits; row by row.

    Every row starts with the same chat template and instruction; with `reuse_prefix` that shared start goes
    through the model once and each batch attends to its keys and values (the same maths as scoring every row
    whole, up to float rounding: tests/test_evaluation.py)."""
    correct, losses = [False] * len(examples), [0.0] * len(examples)
    prefix = shared_prefix(examples) if reuse_prefix else []
    if len(prefix) < MIN_SHARED_PREFIX:
        prefix = []
    rows = [Encoded(input_ids=e.input_ids[len(prefix):], label=e.label) for e in examples] if prefix else examples
    positions = iter(evaluation_order(rows))
    with _installed(host, adapter), host.frozen():
        with autocast_context(host.model, autocast_dtype):
            cached = PrefixCache.of(host.model, prefix) if prefix else None
        for batch in evaluation_batches(rows, batch_size, pad_id):
            with autocast_context(host.model, autocast_dtype):
                logits = class_logits(host.model, batch, label_token_ids, prefix=cached).cpu()
            hits = (logits.argmax(dim=-1) == batch.labels).tolist()
            for hit, loss in zip(hits, F.cross_entropy(logits, batch.labels, reduction="none").tolist()):
                position = next(positions)
                correct[position], losses[position] = hit, loss
    return ClassificationOutcomes(correct, losses)


def evaluate_lm_loss(
    host: AdapterHost,
    examples: Sequence[Encoded],
    *,
    batch_size: int,
    pad_id: int,
    adapter: Adapter | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Mean token cross-entropy of the responses (Dolly held-out loss)."""
    total, weight = 0.0, 0
    with _installed(host, adapter), host.frozen():
        for batch in evaluation_batches(examples, batch_size, pad_id):
            targets = int((batch.labels[:, 1:] != -100).sum())
            with autocast_context(host.model, autocast_dtype):
                total += float(lm_loss(host.model, batch)) * targets
            weight += targets
    return {"loss": total / max(weight, 1), "num_examples": len(examples)}


class _installed:
    """Context manager: evaluate with `adapter` on top of the base, or the base alone when None."""

    def __init__(self, host: AdapterHost, adapter: Adapter | None) -> None:
        self.host, self.adapter = host, adapter

    def __enter__(self) -> None:
        if self.adapter:
            self.host.install(self.adapter)

    def __exit__(self, *exc: object) -> None:
        if self.adapter:
            self.host.clear()
