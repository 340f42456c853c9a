"""FlexLoRA (Bai et al. 2024): average full products, redistribute by SVD truncation.

The server forms the dense ΔW = Σ_k p_k B_k A_k (exact), takes its SVD (as the original code does,
on the dense m × n matrix) and hands client k the best rank-r_k approximation B_k = U_r √S_r,
A_k = √S_r V_rᵀ to start from. Clients train and upload their full adapters; the new ΔW replaces the
old one. The evaluated global model is W + ΔW (kept exactly, as stacked factors of rank Σ r_k).

Scaling follows the FlexLoRA code (alibaba/FederatedScope, FlexLoRA branch, main.py): one lora_alpha = 16 for
every client, so a client of rank r_k has scaling 16/r_k (fed_utils/model_aggregation.py multiplies each
B_k A_k by that 16/r_k before averaging: the scale-free product, as here).

The aggregate itself is exact (aggregation_error ~1e-7, measured like every method's). What redistribution
loses is reported apart, as truncation_loss: the data-weighted mean over clients of
‖ΔW − trunc_{r_k}(ΔW)‖_F / ‖ΔW‖_F, which equals √(Σ_{i>r_k} σ_i² / Σ_i σ_i²) (Eckart–Young).
"""

from __future__ import annotations

import torch

from ..lora.factors import Adapter, ModuleFactors, adapter_from_tensors, fresh_lora
from .aggregation import LoRAScaling, ProductError, data_weights, relative_error
from .base import FederatedMethod, Instruction, TrainSpec, Upload, factor_shapes, factor_tensors, tensor_key


def svd_truncation(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> ModuleFactors:
    """The best rank-`rank` factors of U·diag(S)·Vh, split symmetrically: B = U_r √S_r, A = √S_r V_rᵀ."""
    root = S[:rank].sqrt()
    return ModuleFactors(A=root[:, None] * Vh[:rank], B=U[:, :rank] * root)


class FlexLoRA(FederatedMethod):
    name = "flexlora"
    summary = "FlexLoRA (Bai et al. 2024): average the full products, give each client its rank by SVD truncation"
    options_class = LoRAScaling  # its defaults are FlexLoRA's: lora_alpha 16, 'fixed'
    trained_factors = frozenset({"A", "B"})
    uploaded_factors = frozenset({"A", "B"})
    exact_aggregation = True  # the dense average is exact; the SVD redistribution's loss is truncation_loss

    def init_server_state(self) -> None:
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._error_terms: list[ProductError] = []
        self._global: Adapter | None = None

    def instruct(self, client_id: int, round_: int) -> Instruction:
        rank = self.clients[client_id].max_rank
        tensors = {}
        for name, (U, S, Vh) in self._svd.items():
            start = svd_truncation(U, S, Vh, rank)
            tensors[tensor_key("A", name)], tensors[tensor_key("B", name)] = start.A, start.B
        return Instruction(client_id=client_id, round=round_, tensors=tensors, config={"rank": rank})

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        uploads = sorted(uploads, key=lambda u: u.client_id)
        weights = data_weights([u.num_examples for u in uploads])
        self._global, self._svd, self._error_terms = {}, {}, []
        for name in sorted(self.module_shapes):
            A = [u.tensors[tensor_key("A", name)] for u in uploads]
            B = [u.tensors[tensor_key("B", name)] for u in uploads]
            self._global[name] = ModuleFactors(A=torch.cat(A, dim=0), B=torch.cat([float(p) * b for p, b in zip(weights, B)], dim=1))
            dense = self._global[name].delta()  # Σ_k p_k B_k A_k, the full-size average
            self._svd[name] = torch.linalg.svd(dense, full_matrices=False)
            self._error_terms.append(ProductError(self._global[name].B, self._global[name].A,
                                                  [(float(p), b, a) for p, b, a in zip(weights, B, A)]))

    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rank = int(instruction.config["rank"])
        return factor_shapes(self.module_shapes, self.uploaded_factors, dict.fromkeys(self.module_shapes, rank))

    def aggregation_error(self) -> float | None:
        return relative_error(self._error_terms) if self._error_terms else None

    def round_diagnostics(self) -> dict[str, float]:
        return {"truncation_loss": self.truncation_loss()} if self._svd else {}

    def truncation_loss(self) -> float:
        total = sum(float((S.double() ** 2).sum()) for _, S, _ in self._svd.values())
        if total == 0:
            return 0.0
        sizes = [c.num_examples for c in self.clients.values()]
        errors = [
            (sum(float((S[c.max_rank:].double() ** 2).sum()) for _, S, _ in self._svd.values()) / total) ** 0.5
            for c in self.clients.values()
        ]
        return float(sum(w * e for w, e in zip(data_weights(sizes), errors)))

    def global_adapter(self) -> Adapter | None:
        return self._global

    def client_ranks(self) -> dict[int, dict[str, int]]:
        return {cid: dict.fromkeys(self.module_shapes, c.max_rank) for cid, c in self.clients.items()}

    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        rank = int(instruction.config["rank"])
        if instruction.tensors:
            adapter = adapter_from_tensors(instruction.tensors)
        else:  # round 1: no global update yet
            adapter = fresh_lora(self.module_shapes, rank, self.client_generator(instruction))
        return TrainSpec(adapter=adapter, trainable=self.trained_factors, scaling=self.options.scaling(rank))

    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload:
        tensors = factor_tensors(trained, ("A", "B"))
        return Upload(instruction.client_id, num_examples, tensors, {name: f.rank for name, f in trained.items()})
