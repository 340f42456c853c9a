"""Device budgets → each method's per-client rank (docs/budgets.md).

A client may be described by its resources instead of a rank: memory (MB), uplink per round (MB) and
a relative compute speed. Every method then gets the largest rank whose training memory and upload
fit, computed from what that method trains and uploads at each rank (its declared factors, counted exactly by
aflora.lora.factors.FACTORS: r·n for A, m·r for B, r for Λ, r² for Fed-SB's R), so methods are compared at
equal device budgets rather than equal ranks.

Memory model (per client, float32 weights, AdamW):
    weights            4 · P_base
    LoRA training      16 · trained(r)                 (weights, gradients and two Adam moments)
    activations        L · (34·s·b·h + 5·a·s²·b)       (Korthikanti et al. 2022, 16-bit activations, per block)
Uplink model: 4 · uploaded(r) bytes (float32).
Compute model (`training_flops`, per token; Kaplan et al. 2020's 2 FLOPs per parameter and token forward):
    forward            2 · P_base
    backward           2 · P_base · f       (activation gradients, only down to the lowest adapted block: f = its share)
    LoRA               6 · trained          (the trained factors' forward, activation and weight gradients)

A run that gives ranks instead of budgets can still feed a method that configures itself from budgets
(LEGEND): `budget_for_rank` is the budget a rank-r LoRA on every adaptable module costs under this model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .lora.factors import FACTORS, check_factor_names

MB = 2**20
MAX_RANK = 512  # a search cap: no budget here needs more


@dataclass(frozen=True)
class DeviceBudget:
    memory_mb: float
    uplink_mb: float
    compute_speed: float = 1.0


@dataclass(frozen=True)
class LocalWorkload:
    """What one local round computes: E optimizer steps on batches of b sequences of s tokens."""

    batch_size: int
    seq_len: int
    local_steps: int


@dataclass(frozen=True)
class ModelFootprint:
    """What the budget model needs to know about the base model (read once from the loaded model)."""

    base_params: int
    module_shapes: Mapping[str, tuple[int, int]]  # adaptable modules: (out_features, in_features)
    num_blocks: int
    hidden_size: int
    num_heads: int

    def activation_bytes(self, batch_size: int, seq_len: int, blocks: int | None = None) -> float:
        per_block = 34 * seq_len * batch_size * self.hidden_size + 5 * self.num_heads * seq_len**2 * batch_size
        return (self.num_blocks if blocks is None else blocks) * per_block

    def factor_params(self, factors: frozenset[str], rank: int, modules: Sequence[str] | None = None) -> int:
        """Parameters of `factors` at `rank` over `modules` (all adaptable ones by default): exact for every factor,
        r² for Fed-SB's core R as well as r·(m + n) for A and B (aflora.lora.factors.FACTORS)."""
        check_factor_names(factors, "budget factors")
        names = self.module_shapes if modules is None else modules
        return sum(FACTORS[f].params(*self.module_shapes[name], rank) for name in names for f in factors)

    def params_per_rank(self, factors: frozenset[str], modules: Sequence[str] | None = None) -> int:
        """Parameters one unit of rank costs over `modules`, for factors whose cost is linear in the rank (A, B, Λ)."""
        quadratic = sorted(f for f in factors if f in FACTORS and not FACTORS[f].linear_in_rank)
        if quadratic:
            raise ValueError(f"factors {quadratic} do not cost the same per unit of rank; use factor_params(factors, rank)")
        return self.factor_params(factors, 1, modules)


def training_memory_bytes(footprint: ModelFootprint, trained_params: int, *, batch_size: int, seq_len: int) -> float:
    return 4 * footprint.base_params + 16 * trained_params + footprint.activation_bytes(batch_size, seq_len)


def training_flops(base_params: int, trained_params: int, tokens: float, backward_fraction: float = 1.0) -> float:
    """FLOPs of training `trained_params` LoRA parameters on a frozen base for `tokens` tokens. The frozen base
    computes no weight gradients, and the backward pass stops at the lowest adapted block: a client that adapts
    only the top blocks (LEGEND) back-propagates through `backward_fraction` of the base."""
    return tokens * (2 * base_params + 2 * base_params * backward_fraction + 6 * trained_params)


def uplink_bytes(uploaded_params: int) -> int:
    return 4 * uploaded_params  # float32


def budget_for_rank(
    footprint: ModelFootprint, rank: int, *, trained: frozenset[str], uploaded: frozenset[str], batch_size: int, seq_len: int,
    compute_speed: float = 1.0,
) -> DeviceBudget:
    """The smallest budget that holds a rank-`rank` LoRA on every adaptable module: the inverse of
    `max_rank_within` (a device given by its rank, described by its resources instead)."""
    memory = training_memory_bytes(footprint, footprint.factor_params(trained, rank), batch_size=batch_size, seq_len=seq_len)
    return DeviceBudget(memory / MB, uplink_bytes(footprint.factor_params(uploaded, rank)) / MB, compute_speed)


def max_rank_within(
    budget: DeviceBudget, footprint: ModelFootprint, *, trained: frozenset[str], uploaded: frozenset[str], batch_size: int, seq_len: int
) -> int:
    """The largest rank whose training memory and upload fit the budget (0 when even rank 1 does not)."""
    best = 0
    for rank in range(1, MAX_RANK + 1):
        memory = training_memory_bytes(footprint, footprint.factor_params(trained, rank), batch_size=batch_size, seq_len=seq_len)
        if memory > budget.memory_mb * MB or uplink_bytes(footprint.factor_params(uploaded, rank)) > budget.uplink_mb * MB:
            break
        best = rank
    return best


def ranks_from_budgets(
    budgets: Sequence[DeviceBudget], footprint: ModelFootprint, *, trained: frozenset[str], uploaded: frozenset[str],
    batch_size: int, seq_len: int,
) -> list[int]:
    """Per-client maximum ranks for one method; a client whose budget fits no rank is an error, named."""
    ranks = [max_rank_within(b, footprint, trained=trained, uploaded=uploaded, batch_size=batch_size, seq_len=seq_len) for b in budgets]
    too_small = [cid for cid, r in enumerate(ranks) if r == 0]
    if too_small:
        need = training_memory_bytes(footprint, footprint.factor_params(trained, 1), batch_size=batch_size, seq_len=seq_len) / MB
        raise ValueError(
            f"clients {too_small} cannot train even rank 1 within their budgets (rank 1 needs {need:.0f} MB of memory "
            f"and {uplink_bytes(footprint.factor_params(uploaded, 1)) / MB:.3f} MB of uplink); raise federation.memory_mb / uplink_mb"
        )
    return ranks
