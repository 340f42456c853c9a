"""FLoRIST (Ramesh et al. 2025, arXiv 2506.09199): FLoRA's exact stacking, truncated by singular-value energy
without ever forming the m × n product.

Each round every client trains a fresh LoRA of its own rank r_k, as in FLoRA (this class inherits FLoRA's
client side and its stacking). The server stacks B_s = [B_1 … B_K] (m × Σr) and A_s = [p_1 A_1; …; p_K A_K]
(Σr × n), so B_s A_s = Σ_k p_k B_k A_k exactly, and then, as the reference does
(Anonymous-user-00/FLoRIST, fed_utils/model_aggregation.py, the `if florist:` branch):

    B_s = U_B Σ_B V_Bᵀ,   A_s = U_A Σ_A V_Aᵀ              (thin SVDs of the stacked factors)
    P = Σ_B (V_Bᵀ U_A) Σ_A = U_P Σ_P V_Pᵀ                  (SVD of the small Σr × Σr core)
    B_s A_s = (U_B U_P) Σ_P (V_Pᵀ V_Aᵀ)                      (the SVD of the aggregate)

and keeps the k singular triplets whose cumulative energy Σ_{i≤k} σ_i² / Σ_i σ_i² first reaches τ:
B_g = U_B U_P[:, :k] Σ_P[:k], A_g = (V_Pᵀ V_Aᵀ)[:k] (B carries the singular values, as in the reference). That
rank-k update is merged into every base model and downloaded instead of FLoRA's rank Σ r_k stack.

`aggregation_error` measures the stacked aggregate (exact, like FLoRA's); what the truncation drops is reported
apart as `truncation_loss` = √(Σ_{i>k} σ_i² / Σ_i σ_i²) over all modules (Eckart–Young), and the chosen ranks as
`global_rank` (their mean over modules).

Scaling follows the reference's heterogeneous runs (main.py: `LoraConfig(r=local_ranks[client_id],
lora_alpha=2*local_ranks[client_id])` for `florist` with `heter`): scaling 2 at every rank, FLoRA's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lora.factors import ModuleFactors
from .aggregation import combine_error_terms
from .base import Upload
from .flora import FLoRA, FLoRAOptions


@dataclass
class FLoRISTOptions(FLoRAOptions):
    energy_threshold: float = field(
        default=0.9,
        metadata={"help": "τ: keep the fewest singular values whose energy Σσ_i² reaches this share of the aggregate's "
                          "(per module); the reference's default `threshold` is 0.9."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.energy_threshold <= 1.0:
            raise ValueError(f"florist.energy_threshold is a share of energy and must lie in (0, 1], got {self.energy_threshold}")


def stacked_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the product B·A from the SVDs of B, A and their small core, in float64 (FLoRIST's Eq. for P)."""
    U_B, S_B, Vh_B = torch.linalg.svd(B.double(), full_matrices=False)
    U_A, S_A, Vh_A = torch.linalg.svd(A.double(), full_matrices=False)
    core = S_B[:, None] * (Vh_B @ U_A) * S_A[None, :]
    U_P, S_P, Vh_P = torch.linalg.svd(core, full_matrices=False)
    return U_B @ U_P, S_P, Vh_P @ Vh_A


def energy_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The smallest k with Σ_{i≤k} σ_i² ≥ τ·Σ_i σ_i² (at least 1; all of them if rounding keeps the sum below τ)."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 1  # a zero update: one zero triplet represents it exactly
    reached = (torch.cumsum(energy, dim=0) >= threshold * total).nonzero()
    return int(reached[0]) + 1 if reached.numel() else singular_values.numel()


def truncate_by_energy(stacked: ModuleFactors, threshold: float) -> tuple[ModuleFactors, tuple[float, float]]:
    """The stacked aggregate cut to the rank that keeps energy τ, B carrying the singular values as in the
    reference (B_g = U_k Σ_k, A_g = V_kᵀ); with (dropped Σσ², total Σσ²) for the truncation loss."""
    U, S, Vh = stacked_svd(stacked.B, stacked.A)
    rank = energy_rank(S, threshold)
    energy = S**2
    truncated = ModuleFactors(A=Vh[:rank].to(stacked.A.dtype), B=(U[:, :rank] * S[:rank]).to(stacked.B.dtype))
    return truncated, (float(energy[rank:].sum()), float(energy.sum()))


class FLoRIST(FLoRA):
    name = "florist"
    summary = "FLoRIST (Ramesh et al. 2025): FLoRA's stacking, truncated by singular-value energy"
    options_class = FLoRISTOptions
    exact_aggregation = True  # the stack is exact (measured); its truncation is reported apart (truncation_loss)

    def init_server_state(self) -> None:
        super().init_server_state()
        self._energy_terms: list[tuple[float, float]] = []  # per module: (dropped Σσ², total Σσ²)
        self._global_ranks: dict[str, int] = {}

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        super().aggregate(uploads, round_)  # FLoRA's exact stack, and its aggregation error terms
        stacked = self._update or {}
        truncated = {name: truncate_by_energy(factors, self.options.energy_threshold) for name, factors in stacked.items()}
        self._update = {name: factors for name, (factors, _) in truncated.items()}
        self._energy_terms = [energy for _, energy in truncated.values()]
        self._global_ranks = {name: factors.rank for name, factors in self._update.items()}

    def round_diagnostics(self) -> dict[str, float]:
        if not self._global_ranks:
            return {}
        return {"truncation_loss": combine_error_terms(self._energy_terms),
                "global_rank": sum(self._global_ranks.values()) / len(self._global_ranks)}
