"""The local training loop (engine-agnostic): install a job's adapter, take optimizer steps, read it back.

Clients and the server (AFLoRA's A tuning) run the same loop; only the data and the job differ.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .encoding import Batch
from .lora.factors import Adapter
from .lora.host import AdapterHost
from .methods.base import TrainSpec

log = logging.getLogger(__name__)

OBJECTIVES = ("class_ce", "lm")


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    adapter: Adapter
    mean_loss: float
    steps: int
    tokens: int
    seconds: float


def autocast_context(model: torch.nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision where asked (bf16 matmuls on AMX CPUs and GPUs); master weights stay float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=dtype)


def class_logits(model: torch.nn.Module, batch: Batch, label_token_ids: Sequence[int]) -> torch.Tensor:
    """Logits of each label word's first token at the answer position (rows are left-padded)."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        logits_to_keep=1,  # the vocabulary projection only where the answer is read
    )
    return out.logits[:, -1, list(label_token_ids)].float()


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        labels=batch.labels.to(device),
    )
    return out.loss.float()


def batch_loss(model: torch.nn.Module, batch: Batch, objective: str, label_token_ids: Sequence[int]) -> torch.Tensor:
    if objective == "class_ce":
        # Cross-entropy over the |L| class logits: the paper's F_CE (Eq. 10).
        return F.cross_entropy(class_logits(model, batch, label_token_ids), batch.labels.to(next(model.parameters()).device))
    if objective == "lm":
        return lm_loss(model, batch)
    raise ValueError(f"unknown training objective {objective!r}; expected one of {OBJECTIVES}")


def train_adapter(
    host: AdapterHost,
    spec: TrainSpec,
    batches: Iterator[Batch],
    *,
    steps: int,
    optim: OptimConfig,
    objective: str,
    label_token_ids: Sequence[int] = (),
    autocast_dtype: torch.dtype | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `spec` for `steps` optimizer steps and return the trained factors (scale-free)."""
    host.install(spec.adapter, trainable=spec.trainable, scaling=spec.scaling)
    params = host.trainable_parameters()
    if not params:
        raise ValueError(f"nothing to train: the job marks {sorted(spec.trainable)} trainable but the adapter has none")
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    model = host.model
    model.train()
    started, losses, tokens = time.perf_counter(), [], 0
    try:
        for step in range(1, steps + 1):
            batch = next(batches)
            with autocast_context(model, autocast_dtype):
                loss = batch_loss(model, batch, objective, label_token_ids)
            total = loss if spec.penalty is None else loss + spec.penalty(host.factor_parameters())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            tokens += batch.num_tokens
            if on_step is not None:
                on_step(step, losses[-1])
        trained = host.read()
    finally:
        model.eval()
        host.clear()
    return TrainResult(
        adapter=trained,
        mean_loss=sum(losses) / max(len(losses), 1),
        steps=steps,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )
