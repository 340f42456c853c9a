"""FLoRA (Wang et al. 2024): heterogeneous ranks aggregated exactly by stacking.

Each round every client trains a fresh LoRA of its own rank r_k. The server stacks them,
ΔW = [B_1 … B_K] · [p_1 A_1; …; p_K A_K] = Σ_k p_k B_k A_k (exact), merges ΔW into every base model
and the next round starts from fresh adapters. The stacked update (rank Σ r_k) is what clients must
download to merge. (The public FLoRA code's homogeneous branch keeps only the first client's
adapter; stacking here always covers every client, homogeneous or not.)

Scaling follows the FLoRA code (ATP-1010/FederatedLLM, main.py): a client of rank r_k trains with
lora_alpha = 2·r_k, so every rank has scaling 2 (its homogeneous setting, r = 16 with alpha = 32, too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lora.factors import Adapter, ModuleFactors, fresh_lora
from .aggregation import ALPHA_RULE_HELP, LORA_ALPHA_HELP, LoRAScaling, ProductError, data_weights, relative_error
from .base import FederatedMethod, Instruction, TrainSpec, Upload, factor_shapes, factor_tensors, tensor_key


@dataclass
class FLoRAOptions(LoRAScaling):
    """FederatedLLM main.py: LoraConfig(r=local_ranks[k], lora_alpha=2*local_ranks[k])."""

    lora_alpha: float = field(default=2.0, metadata=LORA_ALPHA_HELP)
    alpha_rule: str = field(default="times_rank", metadata=ALPHA_RULE_HELP)


class FLoRA(FederatedMethod):
    name = "flora"
    summary = "FLoRA (Wang et al. 2024): heterogeneous ranks aggregated exactly by stacking, merged into the base"
    options_class = FLoRAOptions
    trained_factors = frozenset({"A", "B"})
    uploaded_factors = frozenset({"A", "B"})
    exact_aggregation = True  # stacking: [B_1 … B_K]·[p_1 A_1; …; p_K A_K] = Σ_k p_k B_k A_k

    def init_server_state(self) -> None:
        self._update: Adapter | None = None
        self._error_terms: list[ProductError] = []

    def instruct(self, client_id: int, round_: int) -> Instruction:
        # Nothing to send but the rank: adapters start fresh, the last update reaches clients as a base merge.
        return Instruction(client_id=client_id, round=round_, config={"rank": self.clients[client_id].max_rank})

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        uploads = sorted(uploads, key=lambda u: u.client_id)
        weights = data_weights([u.num_examples for u in uploads])
        self._update, self._error_terms = {}, []
        for name in sorted(self.module_shapes):
            A = [u.tensors[tensor_key("A", name)] for u in uploads]
            B = [u.tensors[tensor_key("B", name)] for u in uploads]
            stacked = ModuleFactors(A=torch.cat([float(p) * a for p, a in zip(weights, A)], dim=0), B=torch.cat(B, dim=1))
            self._update[name] = stacked
            self._error_terms.append(ProductError(stacked.B, stacked.A, [(float(p), b, a) for p, b, a in zip(weights, B, A)]))

    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rank = int(instruction.config["rank"])
        return factor_shapes(self.module_shapes, self.uploaded_factors, dict.fromkeys(self.module_shapes, rank))

    def aggregation_error(self) -> float | None:
        return relative_error(self._error_terms) if self._update else None

    def round_merge(self) -> Adapter | None:
        return self._update

    def client_ranks(self) -> dict[int, dict[str, int]]:
        return {cid: dict.fromkeys(self.module_shapes, c.max_rank) for cid, c in self.clients.items()}

    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        rank = int(instruction.config["rank"])
        adapter = fresh_lora(self.module_shapes, rank, self.client_generator(instruction))
        return TrainSpec(adapter=adapter, trainable=self.trained_factors, scaling=self.options.scaling(rank))

    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload:
        tensors = factor_tensors(trained, ("A", "B"))
        return Upload(instruction.client_id, num_examples, tensors, {name: f.rank for name, f in trained.items()})
