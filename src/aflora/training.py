"""The local training loop (engine-agnostic): install a job's adapter, take optimizer steps, read it back.

Clients and the server (AFLoRA's A tuning) run the same loop; only the data and the job differ.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

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


@dataclass
class PrefixCache:
    """Every layer's keys and values for a token prefix that each row of later batches continues. Computed
    under the caller's grad mode: in training, the rows' loss back-propagates into the prefix's one pass
    (through the adapter there too), summed over the rows as if each had run it."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (1, heads, length, head_dim) each

    @classmethod
    def of(cls, model: torch.nn.Module, prefix: Sequence[int]) -> PrefixCache:
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, logits_to_keep=1)
        return cls(len(prefix), [(layer.keys, layer.values) for layer in out.cache.layers])

    def for_rows(self, rows: int, config) -> DynamicCache:
        """A fresh cache per batch: the model appends the batch's own keys and values to it."""
        return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers], config=config)


def forward(model: torch.nn.Module, batch: Batch, *, prefix: PrefixCache | None = None, **kwargs):
    """The model on a batch of left-padded rows. With `prefix`, each row is the continuation of those cached
    tokens: it attends to them and its positions start after them."""
    device = next(model.parameters()).device
    attention, positions, past = batch.attention_mask, batch.position_ids, None
    if prefix is not None:
        rows = batch.input_ids.shape[0]
        attention = torch.cat([torch.ones(rows, prefix.length, dtype=attention.dtype), attention], dim=1)
        positions = positions + prefix.length
        past = prefix.for_rows(rows, model.config)
    return model(input_ids=batch.input_ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
                 cache=past, use_cache=past is not None, **kwargs)


def class_logits(model: torch.nn.Module, batch: Batch, label_token_ids: Sequence[int], *,
                 prefix: PrefixCache | None = None) -> torch.Tensor:
    """Logits of each label word's first token at the answer position (each row's last)."""
    out = forward(model, batch, prefix=prefix, logits_to_keep=1)  # the vocabulary projection only where the answer is read
    return out.logits[:, -1, list(label_token_ids)].float()


def is_deterministic_in_training(model: torch.nn.Module) -> bool:
    """No dropout anywhere (modules or attention): then a batch's shared start may run once for all its rows.
    With dropout, one pass would give every row the same dropout mask there, which is other maths."""
    if float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def lm_loss(model: torch.nn.Module, batch: Batch, *, prefix: PrefixCache | None = None) -> torch.Tensor:
    """Mean cross-entropy over the rows' target tokens. With `prefix`, no row's first token after it is a target
    (collate's split_prefix sees to it): that token's prediction would be read inside the prefix."""
    out = forward(model, batch, prefix=prefix, labels=batch.labels.to(next(model.parameters()).device))
    return out.loss.float()


def batch_loss(model: torch.nn.Module, batch: Batch, objective: str, label_token_ids: Sequence[int]) -> torch.Tensor:
    # A batch's shared start (collate's split_prefix) runs once for all its rows: the same loss and gradients as
    # whole rows, with less work.
    prefix = PrefixCache.of(model, batch.prefix_ids) if batch.prefix_ids else None
    if objective == "class_ce":  # cross-entropy over the |L| class logits: the paper's F_CE (Eq. 10)
        logits = class_logits(model, batch, label_token_ids, prefix=prefix)
        return F.cross_entropy(logits, batch.labels.to(logits.device))
    if objective == "lm":
        return lm_loss(model, batch, prefix=prefix)
    raise ValueError(f"unknown training objective {objective!r}; expected one of {OBJECTIVES}")


class TensorwiseAdam(torch.optim.Optimizer):
    """Adam with one second moment per parameter tensor (the block rule of Adam-mini, Zhang et al. 2024,
    arXiv 2406.16793, with each tensor a block).

    Per-entry Adam moves every entry by ≈ lr per step whatever its gradient's size, so after a few steps
    |λ_j| only counts same-sign steps. Dividing by one RMS per tensor keeps the step's overall size (≈ lr)
    and the gradients' relative sizes: after E steps λ_j ∝ the accumulated ∂L/∂λ_j, which is what DDR reads."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's Optimizer protocol
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), p.new_zeros(())
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(p.grad.pow(2).mean(), alpha=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
                v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(m_hat / (v_hat.sqrt() + group["eps"]), alpha=-group["lr"])


class Optimizers:
    """AdamW for the job's factors, TensorwiseAdam for those in `spec.tensorwise`, each module at lr × its lr_scale."""

    def __init__(self, spec: TrainSpec, factor_params: Mapping[str, Mapping[str, torch.nn.Parameter]], optim: OptimConfig):
        groups: dict[bool, list[dict]] = {False: [], True: []}
        for module, params in factor_params.items():
            lr = optim.lr * spec.lr_scale.get(module, 1.0)
            for factor, param in params.items():
                if param.requires_grad:
                    groups[factor in spec.tensorwise].append({"params": [param], "lr": lr})
        self.params = [p for group in groups[False] + groups[True] for p in group["params"]]
        if not self.params:
            raise ValueError(f"nothing to train: the job marks {sorted(spec.trainable)} trainable but the adapter has none")
        self.optimizers = [cls(groups[tensorwise], lr=optim.lr, weight_decay=optim.weight_decay)
                           for tensorwise, cls in ((False, torch.optim.AdamW), (True, TensorwiseAdam)) if groups[tensorwise]]
        self.max_grad_norm = optim.max_grad_norm

    def step(self, loss: torch.Tensor) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()


def optimize(
    spec: TrainSpec,
    factor_params: Mapping[str, Mapping[str, torch.nn.Parameter]],
    loss_of: Callable[[Batch], torch.Tensor],
    batches: Iterator,
    *,
    steps: int,
    optim: OptimConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[list[float], int]:
    """The local optimisation every job runs (any model): `steps` steps of loss + the job's penalty.
    Returns the per-step task losses and the tokens seen."""
    optimizers = Optimizers(spec, factor_params, optim)
    losses, tokens = [], 0
    for step in range(1, steps + 1):
        batch = next(batches)
        loss = loss_of(batch)
        optimizers.step(loss if spec.penalty is None else loss + spec.penalty(factor_params))
        losses.append(loss.item())
        tokens += getattr(batch, "num_tokens", 0)
        if on_step is not None:
            on_step(step, losses[-1])
    return losses, tokens


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
    model = host.model
    model.train()
    started = time.perf_counter()

    def loss_of(batch: Batch) -> torch.Tensor:
        with autocast_context(model, autocast_dtype):
            return batch_loss(model, batch, objective, label_token_ids)

    try:
        losses, tokens = optimize(spec, host.factor_parameters(), loss_of, batches, steps=steps, optim=optim, on_step=on_step)
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
