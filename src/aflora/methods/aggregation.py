"""Steps that several methods share: LoRA's scaling, weights, zero-padding, weighted sums."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# How a method's reference code sets PEFT's lora_alpha for a client of rank r (docs/methods.md cites each file).
ALPHA_RULES = {
    "fixed": "one lora_alpha at every rank, so scaling = lora_alpha / r (PEFT's default)",
    "times_rank": "lora_alpha · r at rank r, so scaling = lora_alpha at every rank (FLoRA's alpha = 2·r_k)",
}
LORA_ALPHA_HELP = {"help": "LoRA's alpha; how it follows each client's rank is set by alpha_rule."}
ALPHA_RULE_HELP = {"help": "; ".join(f"{name!r}: {meaning}" for name, meaning in ALPHA_RULES.items())}


@dataclass
class LoRAScaling:
    """The scaling a client of rank r trains with, for methods that train plain LoRA.

    Factors travel scale-free (the host folds scaling·B·A into B), so the rule changes no aggregate; it changes
    how fast each rank learns: under Adam a step moves scaling·B·A by about lr·scaling, so 'fixed' makes a
    rank-64 client 16× slower than a rank-4 one and 'times_rank' makes them equal. Methods subclass this to
    set their reference's defaults.
    """

    lora_alpha: float = field(default=16.0, metadata=LORA_ALPHA_HELP)
    alpha_rule: str = field(default="fixed", metadata=ALPHA_RULE_HELP)

    def __post_init__(self) -> None:
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}; set <method>.lora_alpha to a positive number")
        if self.alpha_rule not in ALPHA_RULES:
            raise ValueError(f"alpha_rule must be one of {sorted(ALPHA_RULES)}, got {self.alpha_rule!r} (<method>.alpha_rule)")

    def scaling(self, rank: int) -> float:
        """PEFT's lora_alpha / r for a client training at `rank`."""
        if rank < 1:
            raise ValueError(f"a LoRA rank must be ≥ 1 to be scaled, got {rank}")
        return self.lora_alpha if self.alpha_rule == "times_rank" else self.lora_alpha / rank


def data_weights(num_examples: Sequence[int]) -> torch.Tensor:
    """FedAvg weights p_k = |D_k| / Σ|D| (Eq. 4)."""
    sizes = torch.tensor([float(n) for n in num_examples], dtype=torch.float64)
    if len(sizes) == 0 or (sizes <= 0).any():
        raise ValueError(f"every client needs a positive number of examples to be weighted, got {list(num_examples)}")
    return sizes / sizes.sum()


def rank_aware_weights(ranks: Sequence[int], num_examples: Sequence[int]) -> torch.Tensor:
    """AFLoRA's Eq. 12 weights, normalized so they sum to 1: p_k ∝ log(1 + r_k) · |D_k|.

    The paper writes the product of two separately normalized factors, which does not sum to one
    (two equal clients would get 1/4 each and halve the update); we normalize the product instead.
    """
    if len(ranks) != len(num_examples):
        raise ValueError(f"{len(ranks)} ranks for {len(num_examples)} clients")
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be ≥ 1 to be weighted, got {list(ranks)}")
    raw = torch.tensor([math.log1p(r) * n for r, n in zip(ranks, num_examples)], dtype=torch.float64)
    return raw / raw.sum()


def pad_columns(B: torch.Tensor, kept: torch.Tensor, width: int) -> torch.Tensor:
    """Scatter B's columns to the positions where `kept` is True, zeros elsewhere, `width` columns in all.

    AFLoRA's zero-padding: first to the client's initial rank by its mask, then zero columns up to r_max.
    """
    positions = kept.nonzero().flatten()
    if positions.numel() != B.shape[1]:
        raise ValueError(f"B has {B.shape[1]} columns but the mask keeps {positions.numel()}")
    if kept.numel() > width:
        raise ValueError(f"mask of length {kept.numel()} does not fit in {width} columns")
    padded = B.new_zeros(B.shape[0], width)
    padded[:, positions] = B
    return padded


def pad_rows(A: torch.Tensor, kept: torch.Tensor, width: int) -> torch.Tensor:
    """Row counterpart of `pad_columns` (for methods that also pad A)."""
    return pad_columns(A.T, kept, width).T


# How a zero-padding method weights the rank slices it averages (hetlora.column_weights, aflora.column_weights).
COLUMN_WEIGHTS = {
    "client": "one weight per client for every slice it holds (the method's own weights)",
    "rank_partitioned": "slice j averaged over the clients that hold it, by their data |D_k| (RB-LoRA, raFLoRA)",
}
COLUMN_WEIGHTS_HELP = {"help": "; ".join(f"{name!r}: {meaning}" for name, meaning in COLUMN_WEIGHTS.items())}


def check_column_weights(value: str, section: str) -> None:
    if value not in COLUMN_WEIGHTS:
        raise ValueError(f"{section}.column_weights must be one of {sorted(COLUMN_WEIGHTS)}, got {value!r}")


def slice_weights(client_weights: torch.Tensor, holds: Sequence[torch.Tensor], rule: str) -> torch.Tensor:
    """q_kj, the weight of client k's rank slice j (K × width), for one of COLUMN_WEIGHTS.

    'client': q_kj = p_k wherever k holds j. 'rank_partitioned': q_kj = p_k / Σ_{k' holds j} p_k', so every
    slice is a weighted mean over its own holders and slices only big clients hold are not shrunk by the
    clients that lack them (raFLoRA's rank collapse). With p_k = |D_k|/N this is RB-LoRA's
    compute_column_weights_from_ranks (aggregation.py): N / Σ_{k holds j} |D_k| times the data-weighted sum.
    A slice nobody holds gets weight 0 (it stays zero)."""
    check_column_weights(rule, "<method>")
    held = torch.stack([h.to(torch.float64) for h in holds])
    weights = client_weights.to(torch.float64)[:, None] * held
    if rule == "client":
        return weights
    totals = weights.sum(dim=0, keepdim=True)
    return torch.where(totals > 0, weights / totals.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(weights))


def zero_padded_sum(factors: Sequence[torch.Tensor], holds: Sequence[torch.Tensor], weights: torch.Tensor, *,
                    rank_dim: int) -> torch.Tensor:
    """Σ_k q_k ⊙ pad(T_k): each client's rank slices scattered to the positions it holds (zeros elsewhere),
    slice j weighted by q_kj. rank_dim = 1 for B (m × r columns), 0 for A (r × n rows)."""
    width = weights.shape[1]
    padded = [pad_columns(t, h, width) if rank_dim == 1 else pad_rows(t, h, width) for t, h in zip(factors, holds)]
    total = torch.zeros_like(padded[0], dtype=torch.float64)
    for tensor, q in zip(padded, weights):
        total += (q[None, :] if rank_dim == 1 else q[:, None]) * tensor.to(torch.float64)
    return total.to(factors[0].dtype)


@dataclass(frozen=True)
class Rows:
    """Some rows of a tensor, picked only when used: a client's rows of a shared A (AFLoRA) without a copy per client."""

    of: torch.Tensor
    which: torch.Tensor  # a boolean mask over the rows of `of`

    def tensor(self) -> torch.Tensor:
        return self.of[self.which]


# ProductError's view of one client: its weight (p_k, or q_k, one weight per column of B_k), B_k and A_k
WeightedClient = tuple[float | torch.Tensor, torch.Tensor, torch.Tensor | Rows]


def slice_weighted_clients(weights: torch.Tensor, holds: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
                           A: Sequence[torch.Tensor | Rows]) -> list[WeightedClient]:
    """ProductError's (q_k, B, A) per client under slice weights: Σ_k B_k diag(q_k) A_k is the exact aggregate."""
    return [(q[h.nonzero().flatten()], b, a) for q, h, b, a in zip(weights, holds, B, A)]


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k p_k · T_k, accumulated in float64 for exactness, returned in the tensors' dtype."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors for {len(weights)} weights")
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, weight in zip(tensors, weights):
        total += float(weight) * tensor.to(torch.float64)
    return total.to(tensors[0].dtype)


def low_rank_frobenius_sq(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖U V‖_F² for U (m × R) and V (R × n), in float64, the cheaper way: trace((UᵀU)(VVᵀ)) through the R × R Gram
    matrices (R²·(m + n) multiply-adds) while R is small, else the m × n product itself (m·n·R). ProductError stacks
    every client's factors, so R grows with the clients: the Gram route alone made the aggregation error O(clients²)
    (9 s a round at 100 clients of rank 16 on SmolLM2's 60 modules, 0.2 s at 10)."""
    U, V = U.double(), V.double()
    (m, rank), n = U.shape, V.shape[1]
    if rank * (m + n) <= m * n:
        return float(((U.T @ U) * (V @ V.T)).sum())
    return float((U @ V).square().sum())


class ProductError:
    """One module's aggregation error against the ideal Σ p_k B_k A_k, computed only when asked for.

    It is a diagnostic, not part of any method: keeping it out of `aggregate` keeps the measured
    aggregation time the method's own. The global factors are copied (a server step may change them in
    place later); the clients' factors are uploads, which nothing modifies, or rows of one shared copy
    (`Rows`): nothing per client is copied until the terms are computed, one module at a time. Computed once,
    it lets go of every factor and keeps two numbers: held on, the round's uploads would stay in the server's
    memory and in its checkpoint until the next round (a few MB per client on SmolLM2)."""

    def __init__(self, global_B: torch.Tensor, global_A: torch.Tensor, weighted_clients: Sequence[WeightedClient]) -> None:
        self._factors: tuple[torch.Tensor, torch.Tensor, list[WeightedClient]] | None = (
            global_B.detach().clone(), global_A.detach().clone(), list(weighted_clients))
        self._terms = (0.0, 0.0)  # set once _factors are used up

    def terms(self) -> tuple[float, float]:
        """(‖B_g A_g − Σ p_k B_k A_k‖_F², ‖Σ p_k B_k A_k‖_F²), by stacking the factors (low_rank_frobenius_sq)."""
        if self._factors is not None:
            global_B, global_A, weighted_clients = self._factors
            ideal_U = torch.cat([B.double() * p for p, B, _ in weighted_clients], dim=1)  # p: a number, or per column
            ideal_V = torch.cat([(A.tensor() if isinstance(A, Rows) else A).double() for _, _, A in weighted_clients], dim=0)
            diff_U = torch.cat([ideal_U, -global_B.double()], dim=1)
            diff_V = torch.cat([ideal_V, global_A.double()], dim=0)
            self._terms = (low_rank_frobenius_sq(diff_U, diff_V), low_rank_frobenius_sq(ideal_U, ideal_V))
            self._factors = None
        return self._terms


def relative_error(modules: Sequence[ProductError]) -> float:
    """One relative Frobenius error over all modules: sqrt(Σ error² / Σ ideal²)."""
    return combine_error_terms([module.terms() for module in modules])


def combine_error_terms(terms: Sequence[tuple[float, float]]) -> float:
    """Per-module (error², ideal²) → one relative error."""
    # error² may come from a trace identity (low_rank_frobenius_sq): for an exact aggregate it is ~0 and may round below zero.
    error = max(sum(e for e, _ in terms), 0.0)
    ideal = sum(i for _, i in terms)
    return (error / ideal) ** 0.5 if ideal > 0 else 0.0
