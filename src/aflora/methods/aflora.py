"""AFLoRA (Zhou, Pang, Wang 2025): diagonal LoRA, dynamic rank pruning, decoupled training,
zero-padding rank-aware aggregation.

Choices where the paper is silent or inconsistent are listed in docs/aflora.md; in short:
- Each round starts fresh client adapters (the previous global update is merged into the base):
  B with random unit-norm columns, Λ = 0, so ΔW = 0 at the start and ∂L/∂Λ ≠ 0. (The paper's
  "initialize B and Λ with zeros" would make every gradient zero.) `client_init = "zero_b"` / "zero_b_rs":
  B = 0, Λ = 1/C or 1/(C·√r) instead, diagnostics of what the random start costs; with them
  `train_lambda = false` keeps Λ fixed, so B alone trains against a fixed Λ·A, as in FFA-LoRA.
- Masks are per adapted module (each "local LoRA adapter" of Sec. V-B) and persist on the server.
- A client trains and uploads only its kept dimensions (compact B, Λ against the kept rows of A).
- After the server step, A' is merged as-is, then its rows are renormalized to C for the next round
  so that |λ_j|² keeps measuring information content (Eq. 7 assumes ‖a_j‖ = C).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch

from ..lora.factors import Adapter, ModuleFactors
from .aggregation import (
    COLUMN_WEIGHTS_HELP,
    ProductError,
    Rows,
    check_column_weights,
    data_weights,
    pad_columns,
    rank_aware_weights,
    relative_error,
    slice_weighted_clients,
    slice_weights,
    zero_padded_sum,
)
from .base import FederatedMethod, Instruction, Penalty, ServerTrainer, TrainSpec, Upload, factor_shapes, tensor_key

DDR_RULES = ("eq8", "outlier")
CLIENT_INITS = ("unit_b", "zero_b", "zero_b_rs")
LAMBDA_OPTIMIZERS = ("tensorwise", "adamw")


@dataclass
class AFLoRAOptions:
    beta: float = field(default=1.0, metadata={"help": "DDR threshold β (Eq. 8): prune dimension j when |λ_j|² < β·σ."})
    gamma: float = field(default=0.01, metadata={"help": "Weight γ of the unit-norm penalty on B's columns (Eq. 10)."})
    alpha: float = field(default=0.5, metadata={"help": "Fusion ratio α (Eq. 11): A' = α·A + (1−α)·A_FT."})
    a_row_norm: float = field(
        default=0.0,
        metadata={
            "help": "Norm C of every row of the shared A (Sec. V-B); 0 = √in_features per module, which gives A O(1) "
            "entries so that Λ's optimizer steps move ΔW about as fast as standard LoRA's B (see docs/aflora.md)."
        },
    )
    min_rank: int = field(default=1, metadata={"help": "DDR never prunes a module below this many dimensions."})
    ddr_rule: str = field(
        default="eq8",
        metadata={"help": "'eq8' = the paper's Eq. 8: keep j iff |λ_j|² ≥ β·σ; 'outlier' = the prose's β-σ outlier "
                          "reading: prune j iff |λ_j|² < μ − β·σ (μ, σ: mean and std of the kept |λ|²)."},
    )
    lambda_optimizer: str = field(
        default="tensorwise",
        metadata={"help": "'tensorwise' = Adam with one second moment per module's Λ, so |λ_j|² keeps the gradients' "
                          "relative sizes (docs/aflora.md); 'adamw' = per-entry AdamW (|λ_j| counts same-sign steps)."},
    )
    client_init: str = field(
        default="unit_b",
        metadata={"help": "How a client's adapter starts each round. 'unit_b' (the default, docs/aflora.md choice 1): "
                          "B with random unit-norm columns, Λ = 0. 'zero_b': B = 0, Λ = 1/C (LoRA's own start with "
                          "Λ·A's rows at unit norm); 'zero_b_rs': B = 0, Λ = 1/(C·√r), so a step on B moves ΔW alike "
                          "at every rank (rsLoRA's 1/√r). Both are diagnostics and need aflora.ddr = false."},
    )
    train_lambda: bool = field(
        default=True,
        metadata={"help": "Clients train Λ with B (Sec. V-B). false = Λ stays at its start and B alone is trained, as "
                          "FFA-LoRA trains B against a fixed A: a diagnostic, only with client_init 'zero_b' or 'zero_b_rs' "
                          "(under 'unit_b' Λ = 0 would leave ΔW = 0 for good)."},
    )
    ddr: bool = field(default=True, metadata={"help": "Dynamic rank pruning; false = fixed ranks (ablation 'w/o DDR')."})
    server_tuning: bool = field(
        default=True, metadata={"help": "Tune A on the public set after aggregation; false = ablation 'w/o DLF'."}
    )
    rank_aware_weights: bool = field(
        default=True, metadata={"help": "Weight clients by log(1+r_k)·|D_k| (Eq. 12); false = |D_k| only."}
    )
    # Ablation of Eq. 12: 'rank_partitioned' averages each of the r_max columns over the clients whose mask keeps it.
    column_weights: str = field(default="client", metadata=COLUMN_WEIGHTS_HELP)

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"aflora.beta must be ≥ 0 (it scales a standard deviation), got {self.beta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"aflora.alpha is a fusion ratio and must lie in [0, 1], got {self.alpha}")
        if self.gamma < 0:
            raise ValueError(f"aflora.gamma must be ≥ 0, got {self.gamma}")
        if self.a_row_norm < 0:
            raise ValueError(f"aflora.a_row_norm (C) must be > 0, or 0 for √in_features; got {self.a_row_norm}")
        if self.min_rank < 1:
            raise ValueError(f"aflora.min_rank must be ≥ 1, got {self.min_rank}")
        if self.ddr_rule not in DDR_RULES:
            raise ValueError(f"aflora.ddr_rule must be one of {list(DDR_RULES)}, got {self.ddr_rule!r}")
        if self.lambda_optimizer not in LAMBDA_OPTIMIZERS:
            raise ValueError(f"aflora.lambda_optimizer must be one of {list(LAMBDA_OPTIMIZERS)}, got {self.lambda_optimizer!r}")
        if self.client_init not in CLIENT_INITS:
            raise ValueError(f"aflora.client_init must be one of {list(CLIENT_INITS)}, got {self.client_init!r}")
        if self.client_init != "unit_b" and self.ddr:
            raise ValueError(f"aflora.client_init = {self.client_init!r} starts every |λ_j| equal, so Eq. 8 (keep j iff |λ_j|² ≥ β·σ) "
                             "would keep every dimension and DDR would not prune: set aflora.ddr = false with it")
        if not self.train_lambda and self.client_init == "unit_b":
            raise ValueError("aflora.train_lambda = false keeps Λ at its start, which under client_init = 'unit_b' is 0: "
                             "ΔW = BΛA would stay 0 and nothing would train; set aflora.client_init = 'zero_b_rs' with it")
        check_column_weights(self.column_weights, "aflora")


def normalize_rows(A: torch.Tensor, norm: float) -> torch.Tensor:
    """Scale every row of A to Euclidean norm `norm` (‖a_j‖ = C)."""
    return A * (norm / A.norm(dim=1, keepdim=True).clamp_min(1e-12))


def prune_ranks(lambda_sq: torch.Tensor, beta: float, min_rank: int = 1, rule: str = "eq8") -> torch.Tensor:
    """DDR (Eq. 8): keep dimension j iff |λ_j|² ≥ β·σ, σ the population std of the kept |λ|²
    (rule "outlier": keep j iff |λ_j|² ≥ μ − β·σ, the β-σ rule's low outliers pruned).

    Returns a boolean mask over the given (kept) dimensions. The `min_rank` largest are always
    kept, so a module never loses its last dimension (the rule alone could prune all when β is large).
    """
    sigma = lambda_sq.std(unbiased=False) if lambda_sq.numel() > 1 else lambda_sq.new_zeros(())
    threshold = beta * sigma if rule == "eq8" else lambda_sq.mean() - beta * sigma
    keep = lambda_sq >= threshold
    if int(keep.sum()) < min_rank:
        keep[torch.topk(lambda_sq, min(min_rank, lambda_sq.numel())).indices] = True
    return keep


def relative_change(after: Mapping[str, torch.Tensor], before: Mapping[str, torch.Tensor]) -> float:
    """‖after − before‖_F / ‖before‖_F over all modules."""
    change = sum(float((after[name] - A).pow(2).sum()) for name, A in before.items())
    return (change / sum(float(A.pow(2).sum()) for A in before.values())) ** 0.5


def unit_norm_penalty(gamma: float) -> Penalty:
    """Eq. 10's regularizer γ·Σ_j (‖b_j‖² − 1)² over every module's B columns."""

    def penalty(params: Mapping[str, Mapping[str, torch.nn.Parameter]]) -> torch.Tensor:
        total = sum(((p["B"].pow(2).sum(dim=0) - 1.0) ** 2).sum() for p in params.values())
        return gamma * cast(torch.Tensor, total)

    return penalty


class AFLoRA(FederatedMethod):
    name = "aflora"
    summary = "AFLoRA (Zhou et al. 2025): diagonal LoRA, dynamic rank pruning, server-tuned shared A, rank-aware zero-padded aggregation"
    options_class = AFLoRAOptions
    checked_kinds = frozenset({"mask"})  # a reply's next_mask must lie within the mask it was sent
    trained_factors = frozenset({"B", "lam"})
    uploaded_factors = frozenset({"B"})
    exact_aggregation = True  # A is shared: Σ_k p_k pad(B'_k) · A = Σ_k p_k B'_k A_k (Eq. 13)
    supports_dp = True  # B' is a client's whole contribution (adapters restart every round); B_global a weighted sum
    # SecAgg+ shows the server only Σ_k p_k·pad(B'_k): the weights are fixed before clients mask, and
    # each client multiplies its own padded B' by them (secure_weights, secure_summands, aggregate_secure).
    supports_secure_aggregation = True

    @classmethod
    def needs_public_data(cls, options: AFLoRAOptions) -> bool:
        return options.server_tuning

    # ------------------------------------------------------------------ server
    def init_server_state(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        # Global A (Sec. V-C): r_max random rows, each of norm C; shared by all clients.
        self.A_global: dict[str, torch.Tensor] = {
            name: normalize_rows(torch.randn(self.r_max, n, generator=generator), self.row_norm(name))
            for name, (_, n) in sorted(self.module_shapes.items())
        }
        # H_k: one mask per client and module over its r_k^1 initial dimensions; they only shrink.
        self.masks: dict[int, dict[str, torch.Tensor]] = {
            cid: {name: torch.ones(c.max_rank, dtype=torch.bool) for name in self.A_global}
            for cid, c in self.clients.items()
        }
        self.B_global: dict[str, torch.Tensor] = {}
        self._error_terms: list[ProductError] = []
        self._round_update: Adapter | None = None
        self._a_changes: dict[str, float] = {}

    def instruct(self, client_id: int, round_: int) -> Instruction:
        tensors = {}
        for name, A in self.A_global.items():
            mask = self.masks[client_id][name]
            tensors[tensor_key("mask", name)] = mask.clone()
            # The first r_k^1 rows of the global A, of which only the kept ones are trained against.
            tensors[tensor_key("A", name)] = A[: mask.numel()][mask].clone()
        return Instruction(client_id=client_id, round=round_, tensors=tensors)

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        uploads = sorted(uploads, key=lambda u: u.client_id)  # a fixed order keeps sums bit-reproducible
        self.B_global = {}
        self._error_terms = []
        for name in self.module_shapes:
            B = [u.tensors[tensor_key("B", name)] for u in uploads]
            held = [self.held_columns(self.masks[u.client_id][name]) for u in uploads]
            weights = self.column_weights([u.ranks[name] for u in uploads], [u.num_examples for u in uploads], held)
            self.B_global[name] = zero_padded_sum(B, held, weights, rank_dim=1)  # Eq. 13
            A = self.A_global[name].clone()  # one copy for all clients' rows (the server step may change A_global)
            clients = slice_weighted_clients(weights, held, B, [Rows(A, h) for h in held])
            self._error_terms.append(ProductError(self.B_global[name], A, clients))
        self.advance_masks(uploads)
        self._round_update = None

    def held_columns(self, mask: torch.Tensor) -> torch.Tensor:
        """A client's mask over its r_k^1 initial dimensions, extended with False to the r_max global columns."""
        return torch.cat([mask, mask.new_zeros(self.r_max - mask.numel())])

    def column_weights(self, ranks: list[int], sizes: list[int], held: list[torch.Tensor]) -> torch.Tensor:
        """q_kj of one module (K × r_max): Eq. 12's p_k on every column client k keeps, or (column_weights =
        'rank_partitioned') each column's holders weighted by |D_k| and normalized over that column alone."""
        if self.options.column_weights == "client":
            return slice_weights(self.client_weights(ranks, sizes), held, "client")
        if self.uniform_weights:
            raise ValueError("aflora.column_weights = 'rank_partitioned' gives a column's only holder weight 1, which breaks "
                             "client-level DP's sensitivity bound; use aflora.column_weights = 'client' with privacy")
        return slice_weights(data_weights(sizes), held, "rank_partitioned")

    def client_weights(self, ranks: list[int], sizes: list[int]) -> torch.Tensor:
        """p_k of one module for clients with these ranks and data sizes (Eq. 12, or |D_k| only)."""
        if self.uniform_weights:  # DP: data-dependent weights would break the sensitivity bound
            return torch.full((len(sizes),), 1.0 / len(sizes), dtype=torch.float64)
        if self.options.rank_aware_weights:
            return rank_aware_weights(ranks, sizes)
        return data_weights(sizes)

    def advance_masks(self, uploads: list[Upload]) -> None:
        """The masks pruned by DDR apply from the next round on."""
        for upload in uploads:
            self.masks[upload.client_id] = {
                name: upload.tensors[tensor_key("next_mask", name)].clone() for name in self.A_global
            }

    # ------------------------------------------------------- secure aggregation (aflora.secure_aggregation)
    def secure_weights(self, client_ids: list[int]) -> dict[int, dict[str, float]]:
        """Every asked client's p_k per module, from the server's masks (r_k) and ClientSpecs (|D_k|): the
        weights plain aggregation would compute if all of them reply."""
        if self.options.column_weights != "client":
            raise ValueError("SecAgg+ takes one weight per client and module; aflora.column_weights = "
                             f"{self.options.column_weights!r} needs one per column: use aflora.column_weights = 'client' with secagg")
        ids = sorted(client_ids)
        weights: dict[int, dict[str, float]] = {cid: {} for cid in ids}
        for name in self.A_global:
            ranks = [int(self.masks[cid][name].sum()) for cid in ids]
            for cid, w in zip(ids, self.client_weights(ranks, [self.clients[cid].num_examples for cid in ids])):
                weights[cid][name] = float(w)
        return weights

    def secure_summands(self, instruction: Instruction, upload: Upload, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Client side: p_k·pad(B'_k), m × r_max per module (float64, so quantization is the only rounding)."""
        return {name: float(weights[name]) * pad_columns(upload.tensors[tensor_key("B", name)].double(),
                                                         instruction.tensors[tensor_key("mask", name)], self.r_max)
                for name in self.module_shapes}

    def aggregate_secure(self, sums: Mapping[str, torch.Tensor], uploads: list[Upload],
                         weights: Mapping[int, Mapping[str, float]], round_: int) -> None:
        """Eq. 13 from SecAgg+'s sum over the clients in `uploads` (their clear parts: next_mask, ranks).

        Dividing by the survivors' Σ p_k renormalises when clients dropped out after their weights were
        sent (1 otherwise), which gives the weights plain aggregation computes over the same clients."""
        self.B_global = {}
        for name, (m, _) in self.module_shapes.items():
            if tuple(sums[name].shape) != (m, self.r_max):
                raise ValueError(f"the secure sum of {name} is {tuple(sums[name].shape)}, expected {(m, self.r_max)}")
            total = sum(weights[u.client_id][name] for u in uploads)
            self.B_global[name] = (sums[name].double() / total).float()
        self._error_terms = []  # Σ_k p_k B_k A_k needs every client's B_k, which the server never sees
        self.advance_masks(uploads)
        self._round_update = None

    def add_aggregate_noise(self, std: float, generator: torch.Generator) -> None:
        for name in sorted(self.B_global):
            self.B_global[name] = self.B_global[name] + std * torch.randn(self.B_global[name].shape, generator=generator)

    def server_update(self, trainer: ServerTrainer | None) -> None:
        A_fused = self.A_global
        self._a_changes = {}
        if self.options.server_tuning and trainer is not None:
            spec = TrainSpec(
                adapter={name: ModuleFactors(A=self.A_global[name], B=self.B_global[name]) for name in self.A_global},
                trainable=frozenset({"A"}),  # B_global stays frozen on the server (Sec. V-C)
                lr_scale={name: self.server_lr_scale(name) for name in self.A_global},
            )
            tuned = {name: factors.A for name, factors in trainer(spec).items()}
            alpha = self.options.alpha
            A_fused = {name: alpha * A + (1.0 - alpha) * tuned[name] for name, A in self.A_global.items()}  # Eq. 11
            self._a_changes = {"a_tuning_change": relative_change(tuned, self.A_global),
                               "a_fused_change": relative_change(A_fused, self.A_global)}
        self._round_update = {name: ModuleFactors(A=A_fused[name], B=self.B_global[name]) for name in self.A_global}
        self.A_global = {name: normalize_rows(A, self.row_norm(name)) for name, A in A_fused.items()}

    def row_norm(self, name: str) -> float:
        """C for one module (Sec. V-B)."""
        return self.options.a_row_norm or self.module_shapes[name][1] ** 0.5

    def server_lr_scale(self, name: str) -> float:
        """server.lr multiplier for one module's A: the same relative step as a client's on B.

        An Adam step moves every entry by ≈ lr. A client's B column (unit norm, m entries) thus moves by
        ≈ lr·√m of its norm; A's rows (norm C, n entries) move by lr·√n/C. Scaling A's lr by C·√m/√n makes
        server.lr mean what train.lr means (with C = √n, A's O(1) entries would otherwise barely move)."""
        m, n = self.module_shapes[name]
        return self.row_norm(name) * (m / n) ** 0.5

    def round_diagnostics(self) -> dict[str, float]:
        return dict(self._a_changes)

    def round_merge(self) -> Adapter | None:
        return self._round_update

    def client_ranks(self) -> dict[int, dict[str, int]]:
        return {cid: {name: int(mask.sum()) for name, mask in masks.items()} for cid, masks in self.masks.items()}

    # ------------------------------------------------------------------ client
    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        masks = {name: instruction.tensors[tensor_key("mask", name)] for name in self.module_shapes}
        expected = factor_shapes(self.module_shapes, {"B"}, {name: int(mask.sum()) for name, mask in masks.items()})
        expected.update({tensor_key("next_mask", name): ((mask.numel(),), torch.bool) for name, mask in masks.items()})
        return expected

    def check_upload(self, upload: Upload, instruction: Instruction) -> str | None:
        for name in self.module_shapes:
            mask, next_mask = instruction.tensors[tensor_key("mask", name)], upload.tensors[tensor_key("next_mask", name)]
            if (next_mask & ~mask).any():
                return f"the mask of {name} grows (masks only shrink: a pruned dimension cannot come back)"
            if not next_mask.any():
                return f"the mask of {name} keeps no dimension"
        return None

    def aggregation_error(self) -> float | None:
        # ~1e-7: exact up to float32; None after a secure round (the server never sees the B_k)
        return relative_error(self._error_terms) if self._error_terms else None

    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        generator = self.client_generator(instruction)
        adapter: Adapter = {}
        for name, (m, _) in sorted(self.module_shapes.items()):
            A = instruction.tensors[tensor_key("A", name)]
            r = A.shape[0]
            if self.options.client_init != "unit_b":  # ∂L/∂B ≠ 0 in every output direction from the first step
                start = 1.0 / self.row_norm(name)  # Λ·A's rows at unit norm
                if self.options.client_init == "zero_b_rs":
                    start /= r**0.5  # a step on B then moves ΔW alike at every rank
                adapter[name] = ModuleFactors(A=A, B=torch.zeros(m, r), lam=torch.full((r,), start))
            else:  # ∂L/∂Λ ≠ 0; B's first steps move ΔW only within its random columns' span
                B = torch.randn(m, r, generator=generator)
                adapter[name] = ModuleFactors(A=A, B=B / B.norm(dim=0, keepdim=True), lam=torch.zeros(r))
        trainable = self.trained_factors if self.options.train_lambda else frozenset({"B"})
        tensorwise = frozenset({"lam"}) & trainable if self.options.lambda_optimizer == "tensorwise" else frozenset()
        return TrainSpec(adapter=adapter, trainable=trainable, penalty=unit_norm_penalty(self.options.gamma),
                         tensorwise=tensorwise)

    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload:
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        for name, factors in trained.items():
            mask = instruction.tensors[tensor_key("mask", name)]
            tensors[tensor_key("B", name)] = factors.scaled_B().detach().clone()  # B' = B·Λ on kept columns
            ranks[name] = factors.rank
            next_mask = mask.clone()
            if self.options.ddr:
                if factors.lam is None:
                    raise ValueError(f"the trained adapter of {name} has no Λ: AFLoRA's DDR prunes by |λ_j|² (Eq. 8)")
                next_mask[mask.nonzero().flatten()] = prune_ranks(factors.lam.detach() ** 2, self.options.beta,
                                                                  self.options.min_rank, self.options.ddr_rule)
            tensors[tensor_key("next_mask", name)] = next_mask
        return Upload(instruction.client_id, num_examples, tensors, ranks)
