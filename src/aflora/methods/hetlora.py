"""HETLoRA (Cho et al. 2024): zero-padded heterogeneous ranks, rank self-pruning, sparsity weights.

- Distribution: client k gets the first r_k rank slices of the global A (r_max × n) and B (m × r_max).
- Local training adds λ·Σ_modules ‖A[t:r]‖_F·‖B[:, t:r]‖_F on the trailing slices t = ⌊γ·r⌋..r of the factors
  of ΔW = BA (the effective ones, whatever LoRA's scaling). It is computed on the live parameters, so it really
  pushes the tail towards zero (a public reimplementation computes it on detached tensors, which makes it
  inert; a test checks its gradient).
- Self-pruning: if training shrank that tail norm below what the client received, its rank becomes
  max(min_rank, ⌊γ·r⌋) from the next round on (one rank per client, as in the paper's r_k).
- Aggregation: zero-pad every A/B to r_max and average with sparsity weights p_k ∝ ‖B_k A_k‖_F
  (`column_weights = "rank_partitioned"`: each rank slice averaged over its holders by |D_k| instead, RB-LoRA).

HETLoRA has no public code. Its paper writes ΔW = BA with no alpha, and finds that higher ranks learn faster:
so one scaling for every rank, as in the closest public code, the zero-padding (HETLoRA) baseline of FLoRA's
repository (ATP-1010/FederatedLLM, main.py: lora_alpha = 2·r_k, scaling 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch

from ..lora.factors import Adapter, ModuleFactors, adapter_from_tensors, fresh_lora
from .aggregation import (
    ALPHA_RULE_HELP,
    COLUMN_WEIGHTS_HELP,
    LORA_ALPHA_HELP,
    LoRAScaling,
    ProductError,
    check_column_weights,
    data_weights,
    low_rank_frobenius_sq,
    relative_error,
    slice_weighted_clients,
    slice_weights,
    zero_padded_sum,
)
from .base import FederatedMethod, Instruction, Penalty, TrainSpec, Upload, factor_shapes, factor_tensors, tensor_key


@dataclass
class HetLoRAOptions(LoRAScaling):
    lora_alpha: float = field(default=2.0, metadata=LORA_ALPHA_HELP)
    alpha_rule: str = field(default="times_rank", metadata=ALPHA_RULE_HELP)
    reg_weight: float = field(default=0.01, metadata={"help": "λ of the self-pruning regularizer on the trailing rank slices."})
    keep_ratio: float = field(default=0.9, metadata={"help": "γ: slices ⌊γ·r⌋..r are regularized and pruned together."})
    min_rank: int = field(default=1, metadata={"help": "Self-pruning never goes below this rank."})
    self_pruning: bool = field(default=True, metadata={"help": "Prune ranks whose tail norm shrank (false: fixed ranks)."})
    # 'client' is the paper's sparsity weighting; 'rank_partitioned' replaces it with RB-LoRA's per-slice data weights.
    column_weights: str = field(default="client", metadata=COLUMN_WEIGHTS_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reg_weight < 0:
            raise ValueError(f"hetlora.reg_weight must be ≥ 0, got {self.reg_weight}")
        if not 0.0 < self.keep_ratio < 1.0:
            raise ValueError(f"hetlora.keep_ratio must lie in (0, 1), got {self.keep_ratio}")
        if self.min_rank < 1:
            raise ValueError(f"hetlora.min_rank must be ≥ 1, got {self.min_rank}")
        check_column_weights(self.column_weights, "hetlora")


def tail_start(rank: int, keep_ratio: float, min_rank: int) -> int:
    """First regularized slice: ⌊γ·r⌋, never below min_rank (so small ranks are not wiped out)."""
    return max(min_rank, int(keep_ratio * rank))


def tail_norm(A: torch.Tensor, B: torch.Tensor, start: int) -> torch.Tensor:
    return A[start:].norm() * B[:, start:].norm()


def tail_penalty(weight: float, start: int, scaling: float) -> Penalty:
    """λ·Σ ‖A[t:]‖‖B[:, t:]‖ over live parameters (gradients flow into the tail slices).

    The host stores B divided by LoRA's scaling; multiplying it back puts the penalty on the factors of
    ΔW = BA, so λ means the same at every rank and under any alpha rule.
    """

    def penalty(params: Mapping[str, Mapping[str, torch.nn.Parameter]]) -> torch.Tensor:
        return weight * cast(torch.Tensor, sum(tail_norm(p["A"], scaling * p["B"], start) for p in params.values()))

    return penalty


class HetLoRA(FederatedMethod):
    name = "hetlora"
    summary = "HETLoRA (Cho et al. 2024): zero-padded heterogeneous ranks, rank self-pruning, sparsity weights"
    options_class = HetLoRAOptions
    trained_factors = frozenset({"A", "B"})
    uploaded_factors = frozenset({"A", "B"})
    exact_aggregation = False  # zero-padded averages of A and B separately: not Σ p_k B_k A_k

    def init_server_state(self) -> None:
        self.global_factors: Adapter = fresh_lora(self.module_shapes, self.r_max, torch.Generator().manual_seed(self.seed))
        self.ranks = {cid: c.max_rank for cid, c in self.clients.items()}
        self._error_terms: list[ProductError] = []

    def instruct(self, client_id: int, round_: int) -> Instruction:
        rank = self.ranks[client_id]
        tensors = {}
        for name, factors in self.global_factors.items():
            tensors[tensor_key("A", name)] = factors.A[:rank].clone()
            tensors[tensor_key("B", name)] = factors.B[:, :rank].clone()
        return Instruction(client_id=client_id, round=round_, tensors=tensors, config={"rank": rank})

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        uploads = sorted(uploads, key=lambda u: u.client_id)
        self._error_terms = []
        for name in sorted(self.module_shapes):
            A = [u.tensors[tensor_key("A", name)] for u in uploads]
            B = [u.tensors[tensor_key("B", name)] for u in uploads]
            prefix = [torch.arange(self.r_max) < a.shape[0] for a in A]  # a client of rank r holds slices 0..r-1
            weights = slice_weights(self.client_weights(A, B, [u.num_examples for u in uploads]), prefix, self.options.column_weights)
            global_A = zero_padded_sum(A, prefix, weights, rank_dim=0)
            global_B = zero_padded_sum(B, prefix, weights, rank_dim=1)
            self.global_factors[name] = ModuleFactors(A=global_A, B=global_B)
            self._error_terms.append(ProductError(global_B, global_A, slice_weighted_clients(weights, prefix, B, A)))
        for upload in uploads:
            self.ranks[upload.client_id] = int(upload.tensors["next_rank"])

    def client_weights(self, A: list[torch.Tensor], B: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
        """p_k of one module: sparsity weights ∝ ‖B_k A_k‖_F (clients whose update carries more energy count
        more), or |D_k| when slices are rank-partitioned (RB-LoRA weighs the holders of a slice by their data)."""
        if self.options.column_weights == "rank_partitioned":
            return data_weights(sizes)
        norms = [low_rank_frobenius_sq(b, a) ** 0.5 for a, b in zip(A, B)]
        return torch.tensor(norms, dtype=torch.float64) / sum(norms) if sum(norms) > 0 else data_weights(sizes)

    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rank = int(instruction.config["rank"])
        expected = factor_shapes(self.module_shapes, self.uploaded_factors, dict.fromkeys(self.module_shapes, rank))
        expected["next_rank"] = ((), torch.int64)
        return expected

    def check_upload(self, upload: Upload, instruction: Instruction) -> str | None:
        rank, next_rank = int(instruction.config["rank"]), int(upload.tensors["next_rank"])
        if not self.options.min_rank <= next_rank <= rank:
            return f"next rank {next_rank} is outside [{self.options.min_rank}, {rank}] (ranks only shrink)"
        return None

    def aggregation_error(self) -> float | None:
        return relative_error(self._error_terms) if self._error_terms else None

    def global_adapter(self) -> Adapter | None:
        return self.global_factors

    def client_ranks(self) -> dict[int, dict[str, int]]:
        return {cid: dict.fromkeys(self.module_shapes, rank) for cid, rank in self.ranks.items()}

    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        rank = int(instruction.config["rank"])
        adapter = adapter_from_tensors(instruction.tensors)
        start, scaling = tail_start(rank, self.options.keep_ratio, self.options.min_rank), self.options.scaling(rank)
        penalty = tail_penalty(self.options.reg_weight, start, scaling) if start < rank and self.options.reg_weight > 0 else None
        return TrainSpec(adapter=adapter, trainable=self.trained_factors, scaling=scaling, penalty=penalty)

    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload:
        rank = int(instruction.config["rank"])
        start = tail_start(rank, self.options.keep_ratio, self.options.min_rank)
        next_rank = rank
        if self.options.self_pruning and start < rank:
            sent = instruction.tensors
            before = sum(float(tail_norm(sent[tensor_key("A", n)], sent[tensor_key("B", n)], start)) for n in trained)
            after = sum(float(tail_norm(f.A, f.B, start)) for f in trained.values())
            next_rank = start if after < before else rank
        tensors = factor_tensors(trained, ("A", "B"))
        tensors["next_rank"] = torch.tensor(next_rank)
        return Upload(instruction.client_id, num_examples, tensors, {name: f.rank for name, f in trained.items()})
