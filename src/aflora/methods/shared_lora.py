"""One LoRA adapter of one rank for every client, averaged with FedAvg weights |D_k| (Eq. 2).

FedIT, FFA-LoRA and FedSA-LoRA differ only in which factors clients train and which they share:

| method | trains | shares (uploads, averaged) | keeps locally |
|---|---|---|---|
| FedIT (Zhang et al. 2024)        | A, B | A, B | –                |
| FFA-LoRA (Sun et al. 2024)       | B    | B    | – (A stays at its random start, identical everywhere) |
| FedSA-LoRA (Guo et al. 2025)     | A, B | A    | B (personal)     |

FedSA-LoRA has no global B. To evaluate a *global* model at all, its clients also report their personal B
as evaluation-only tensors (`eval/B/...`): the server averages them into the evaluated model only, never
sends them back, and that traffic is reported apart from the protocol's uplink (`eval_uplink_bytes`).

The rank is the smallest client budget, so every client can run it (the AFLoRA paper's choice for
homogeneous baselines), unless `rank` is set.

Scaling: every reference sets one lora_alpha = 16 whatever the rank, so scaling = 16 / rank. FedIT
(JayZhang42/FederatedGPT-Shepherd, main.py: lora_r 16, lora_alpha 16); FedSA-LoRA (Pengxin-Guo/FedSA-LoRA,
federatedscope/{glue,llm}/yamls/fedsa-lora.yaml: r 8, lora_alpha 16); FFA-LoRA has no public code: the FedSA-LoRA
repository's freeze_A reimplementation runs it with that same configuration, and the FFA-LoRA paper shows that
with A frozen alpha only rescales the learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lora.factors import Adapter, ModuleFactors, fresh_lora
from .aggregation import LoRAScaling, ProductError, data_weights, relative_error, weighted_sum
from .base import EVAL_PREFIX, FederatedMethod, Instruction, TrainSpec, Upload, factor_shapes, factor_tensors, tensor_key


@dataclass
class SharedLoRAOptions(LoRAScaling):  # the references' defaults: lora_alpha 16, 'fixed'
    rank: int = field(default=0, metadata={"help": "One rank for every client; 0 = the smallest client budget."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 0:
            raise ValueError(f"rank must be ≥ 0 (0 = the smallest client budget), got {self.rank}")


class SharedLoRA(FederatedMethod):
    """The homogeneous family; subclasses only declare their factor sets."""

    options_class = SharedLoRAOptions
    heterogeneous = False
    kept_factors: frozenset[str] = frozenset()

    @property
    def rank(self) -> int:
        return self.options.rank or min(c.max_rank for c in self.clients.values())

    # ------------------------------------------------------------------ server
    def init_server_state(self) -> None:
        self.global_factors: Adapter = fresh_lora(self.module_shapes, self.rank, torch.Generator().manual_seed(self.seed))
        self.local_B_mean: dict[str, torch.Tensor] | None = None
        self._error_terms: list[ProductError] | None = None

    def instruct(self, client_id: int, round_: int) -> Instruction:
        tensors = {}
        for name, factors in self.global_factors.items():
            tensors[tensor_key("A", name)] = factors.A.clone()
            if "B" not in self.kept_factors:
                tensors[tensor_key("B", name)] = factors.B.clone()
        return Instruction(client_id=client_id, round=round_, tensors=tensors)

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        uploads = sorted(uploads, key=lambda u: u.client_id)
        weights = data_weights([u.num_examples for u in uploads])
        self._error_terms = [] if self.uploaded_factors == {"A", "B"} else None
        for name, factors in self.global_factors.items():
            averaged = {f: weighted_sum([u.tensors[tensor_key(f, name)] for u in uploads], weights) for f in self.uploaded_factors}
            if self._error_terms is not None:  # FedIT: the product of averages is not the average of products (Eq. 5)
                clients = [(float(w), u.tensors[tensor_key("B", name)], u.tensors[tensor_key("A", name)]) for w, u in zip(weights, uploads)]
                self._error_terms.append(ProductError(averaged["B"], averaged["A"], clients))
            if "B" in self.kept_factors:  # FedSA-LoRA: the evaluated global model uses the mean personal B
                averaged["B"] = weighted_sum([u.tensors[EVAL_PREFIX + tensor_key("B", name)] for u in uploads], weights)
            self.global_factors[name] = ModuleFactors(**{**factors.tensors(), **averaged})  # frozen factors stay as they were

    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        ranks = dict.fromkeys(self.module_shapes, self.rank)
        expected = factor_shapes(self.module_shapes, self.uploaded_factors, ranks)
        expected.update(factor_shapes(self.module_shapes, self.kept_factors, ranks, prefix=EVAL_PREFIX))
        return expected

    def aggregation_error(self) -> float | None:
        if self._error_terms is not None:
            return relative_error(self._error_terms)
        return 0.0 if self.uploaded_factors == {"B"} else None  # FFA: A is shared and frozen, so ΣpB·A is exact

    def global_adapter(self) -> Adapter | None:
        return self.global_factors

    def client_ranks(self) -> dict[int, dict[str, int]]:
        return {cid: dict.fromkeys(self.module_shapes, self.rank) for cid in self.clients}

    def evaluation_instruction(self, client_id: int, round_: int) -> Instruction:
        """The shared factors only: a FedSA-LoRA client pairs them with its own B (see client_model)."""
        return self.instruct(client_id, round_)

    # ------------------------------------------------------------------ client
    def client_model(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> Adapter:
        return self.local_job(instruction, local_state).adapter

    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        adapter = {}
        for name, (m, _) in sorted(self.module_shapes.items()):
            A = instruction.tensors[tensor_key("A", name)]
            key = tensor_key("B", name)
            # A personal B is what the client kept; it starts at zero like LoRA's B.
            B = instruction.tensors[key] if key in instruction.tensors else (local_state or {}).get(key, torch.zeros(m, A.shape[0]))
            adapter[name] = ModuleFactors(A=A, B=B)
        return TrainSpec(adapter=adapter, trainable=self.trained_factors, scaling=self.options.scaling(self.rank))

    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload:
        tensors = factor_tensors(trained, self.uploaded_factors)
        kept = factor_tensors(trained, self.kept_factors)
        tensors.update({EVAL_PREFIX + key: value for key, value in kept.items()})  # evaluation only, see module doc
        ranks = {name: factors.rank for name, factors in trained.items()}
        return Upload(instruction.client_id, num_examples, tensors, ranks, local_state=kept)


class FedIT(SharedLoRA):
    name = "fedit"
    summary = "FedIT (Zhang et al. 2024): one rank for every client, FedAvg of A and B"
    trained_factors = frozenset({"A", "B"})
    uploaded_factors = frozenset({"A", "B"})
    exact_aggregation = False  # the product of averages is not the average of products (Eq. 5)


class FFALoRA(SharedLoRA):
    name = "ffa_lora"
    summary = "FFA-LoRA (Sun et al. 2024): A frozen at its shared random start, clients train and average B"
    trained_factors = frozenset({"B"})
    uploaded_factors = frozenset({"B"})
    exact_aggregation = True  # A is shared and frozen: (Σ p_k B_k)·A = Σ p_k B_k A


class FedSALoRA(SharedLoRA):
    name = "fedsa_lora"
    summary = "FedSA-LoRA (Guo et al. 2025): A averaged, every client keeps its own B"
    trained_factors = frozenset({"A", "B"})
    uploaded_factors = frozenset({"A"})
    kept_factors = frozenset({"B"})
    exact_aggregation = None  # B stays personal: no single global product
