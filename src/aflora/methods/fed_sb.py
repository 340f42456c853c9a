"""Fed-SB (Singhal, Ponkshe, Vepakomma et al. 2025, arXiv 2502.15436): federated LoRA-SB.

Every module's update is ΔW = B · R · A with B (m × r) and A (r × n) frozen and identical on every client;
clients train only the r × r matrix R between them and upload it, and the server averages R:

    Σ_k p_k B R_k A = B (Σ_k p_k R_k) A                       (exact: B and A are shared and frozen)

so the uplink is r² numbers per module, whatever the number of clients. The next round starts every client
from the averaged R (CERT-Lab/fed-sb, fed/CR/multiround_train_cr_fed.py: `client_state_dict[key] =
aggregated_R_dict[key]` for the `lora_latent` keys); the global model is B R̄ A on top of the base.

Reference conventions (CERT-Lab/fed-sb, read in its fork putssander/fed-sb):
- Aggregation: fed/fed_agg.py `aggregate_models_fed_sb` averages the `default_lora_latent_mapping` weights (R)
  only, uniformly (`.mean(0)`, equal client shares); we weight by p_k = |D_k|/Σ|D| like every method here (the
  same on equal partitions).
- Scaling: fed/CR/train_cr_fed.py sets `args.lora_alpha = args.lora_r` when `agg_type == "fed-sb"`, so
  scaling = alpha/r = 1 at every rank: `times_rank` with lora_alpha 1. (With B frozen the host's fold of the
  scaling into B leaves R's training unchanged at any scaling, so 1 is also the only value that changes nothing.)
- Initialisation (utils/initialization_utils.py `find_and_initialize_grad`, utils/gradient_utils.py): LoRA-SB
  estimates ΔW_0 = −lr·sign(Σ∇W) over `num_samples` (170) pooled training examples, takes its rank-r truncated
  SVD U_r Σ_r V_rᵀ (utils/svd_utils.py), and sets B = U_r (orthonormal columns), A = V_rᵀ (orthonormal rows),
  R = Σ_r. The script computes that gradient once on the whole training set before splitting it among clients.
  **Departure**: a method sees tensors, never the model or data (methods/base.py), and the protocol has no
  full-gradient pass, so B and A are orthonormal from a seeded Gaussian (QR) — the reference's geometry
  without its data — and R starts at 0, so ΔW = 0 at the start as in plain LoRA (the reference's other,
  data-free start, `find_and_initialize`, also starts R near 0: N(0, 1e-5)). ∂L/∂R = Bᵀ·∂L/∂ΔW·Aᵀ is nonzero,
  so R trains from the first step. Clients regenerate B and A from the run seed (as the reference's clients
  each rerun the same deterministic initialisation), so only R travels, down and up.
- One rank for every client (the reference has no heterogeneous ranks): the smallest budget, or `fed_sb.rank`,
  as FedIT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..lora.factors import Adapter, ModuleFactors
from .aggregation import ALPHA_RULE_HELP, LORA_ALPHA_HELP, ProductError, data_weights, relative_error
from .base import Instruction, TrainSpec, Upload, tensor_key
from .shared_lora import SharedLoRA, SharedLoRAOptions


@dataclass
class FedSBOptions(SharedLoRAOptions):
    """fed-sb fed/CR/train_cr_fed.py: lora_alpha = lora_r for fed-sb, so scaling 1 at every rank."""

    lora_alpha: float = field(default=1.0, metadata=LORA_ALPHA_HELP)
    alpha_rule: str = field(default="times_rank", metadata=ALPHA_RULE_HELP)


def orthonormal_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, B (m × r) with orthonormal columns and A (r × n) with orthonormal rows, from `seed` alone.

    The same seed gives the same factors in every process, so server and clients share them without sending them."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, (m, n) in sorted(shapes.items()):
        if rank > min(m, n):
            raise ValueError(f"Fed-SB's rank {rank} exceeds module {name}'s size {m} × {n}: B and A cannot be orthonormal; "
                             f"set fed_sb.rank to at most {min(m, n)} (or lower the client ranks)")
        B = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64)).Q
        A = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64)).Q.T
        factors[name] = (B.float().contiguous(), A.float().contiguous())
    return factors


class FedSB(SharedLoRA):
    name = "fed_sb"
    summary = "Fed-SB (Singhal et al. 2025): B and A frozen and shared, clients train and average only the r × r R"
    options_class = FedSBOptions
    trained_factors = frozenset({"R"})
    uploaded_factors = frozenset({"R"})
    exact_aggregation = True  # B and A are shared and frozen: B (Σ p_k R_k) A = Σ p_k B R_k A

    @cached_property
    def frozen_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(B, A) per module: computed once per process from the run seed, identical on server and clients."""
        return orthonormal_factors(self.module_shapes, self.rank, self.seed)

    def with_core(self, R: dict[str, torch.Tensor]) -> Adapter:
        """The full adapter B·R·A for the given cores (B and A the shared frozen factors)."""
        return {name: ModuleFactors(A=A, B=B, R=R[name]) for name, (B, A) in self.frozen_factors.items()}

    # ------------------------------------------------------------------ server
    def init_server_state(self) -> None:
        self.global_factors = self.with_core({name: torch.zeros(self.rank, self.rank) for name in self.module_shapes})
        self._error_terms = None

    def instruct(self, client_id: int, round_: int) -> Instruction:
        """Only the global R: the client rebuilds B and A from the seed (frozen_factors)."""
        tensors = {tensor_key("R", name): factors.tensors()["R"].clone() for name, factors in self.global_factors.items()}
        return Instruction(client_id=client_id, round=round_, tensors=tensors)

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        super().aggregate(uploads, round_)  # R̄ = Σ p_k R_k, B and A kept
        uploads = sorted(uploads, key=lambda u: u.client_id)
        weights = data_weights([u.num_examples for u in uploads])
        # Measured, not assumed: B R̄ A against Σ p_k (B R_k) A
        self._error_terms = [
            ProductError(factors.scaled_B(), factors.A,
                         [(float(p), factors.B @ u.tensors[tensor_key("R", name)], factors.A) for p, u in zip(weights, uploads)])
            for name, factors in sorted(self.global_factors.items())
        ]

    def aggregation_error(self) -> float | None:
        return None if self._error_terms is None else relative_error(self._error_terms)

    # ------------------------------------------------------------------ client
    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        adapter = self.with_core({name: instruction.tensors[tensor_key("R", name)] for name in self.module_shapes})
        return TrainSpec(adapter=adapter, trainable=self.trained_factors, scaling=self.options.scaling(self.rank))
