"""Low-rank factors as plain tensors: the currency between clients, server and methods.

Every method reads and writes adapters in one scale-free convention, ΔW = B · core · A, so that aggregation
math never has to know about LoRA's alpha/r scaling (the host folds it in and out). The core between B and A
is the identity (plain LoRA), a diagonal Λ (AFLoRA) or a full r × r matrix R (Fed-SB).

`FACTORS` is the one place that knows each factor: its name (ModuleFactors' attribute and the prefix of its
message keys), its shape for a module of out_features m, in_features n at rank r, its parameter count, and
where a PEFT LoRA layer keeps it. Shapes, budgets, trainability and the host all ask this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Factor:
    """One kind of low-rank factor."""

    name: str  # ModuleFactors' attribute; message keys are "<name>/<module>" (tensor_key)
    shape: Callable[[int, int, int], tuple[int, ...]]  # (out_features m, in_features n, rank r) -> tensor shape
    peft_attribute: str  # the per-adapter dict on a PEFT LoRA layer that holds it (lora_A/lora_B: Linear modules)
    # Cores only: B with the core folded in, so that ΔW = fold_into_B(B, core) · A.
    fold_into_B: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def is_core(self) -> bool:
        return self.fold_into_B is not None

    def folded(self, B: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """B with this core folded in (cores only)."""
        if self.fold_into_B is None:
            cores = [name for name, factor in FACTORS.items() if factor.is_core]
            raise ValueError(f"factor {self.name!r} is not a core between B and A; only the cores {cores} fold into B")
        return self.fold_into_B(B, core)

    def params(self, m: int, n: int, rank: int) -> int:
        """Parameters of this factor for one module at `rank` (exact: R's grow as r², the others as r)."""
        return math.prod(self.shape(m, n, rank))

    @property
    def linear_in_rank(self) -> bool:
        """Whether every unit of rank costs the same (A, B, Λ), so a cost per rank means something (not R)."""
        return self.params(1, 1, 2) == 2 * self.params(1, 1, 1)


FACTORS: dict[str, Factor] = {f.name: f for f in (
    Factor("A", lambda m, n, r: (r, n), "lora_A"),
    Factor("B", lambda m, n, r: (m, r), "lora_B"),
    Factor("lam", lambda m, n, r: (r,), "lora_lambda", fold_into_B=lambda B, lam: B * lam),  # AFLoRA's Λ (Eq. 6)
    Factor("R", lambda m, n, r: (r, r), "lora_core", fold_into_B=lambda B, R: B @ R),  # Fed-SB's (LoRA-SB's) r×r core
)}
FACTOR_NAMES = tuple(FACTORS)


def check_factor_names(names, what: str) -> None:
    """Refuse names that are not factors, saying which are."""
    unknown = sorted(set(names) - set(FACTORS))
    if unknown:
        raise ValueError(f"{what}: unknown factor names {unknown}; the factors are {list(FACTOR_NAMES)} (aflora.lora.factors.FACTORS)")


@dataclass
class ModuleFactors:
    """Factors of one adapted weight matrix W (out_features × in_features): ΔW = B · core · A."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)
    lam: torch.Tensor | None = None  # (rank,) diagonal Λ; None means the identity
    R: torch.Tensor | None = None  # (rank, rank) full core (Fed-SB); None means the identity

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"low-rank factors do not fit together: A is {tuple(self.A.shape)}, B is {tuple(self.B.shape)}; "
                "expected A (rank × in_features) and B (out_features × rank) with the same rank"
            )
        cores = [name for name in FACTOR_NAMES if FACTORS[name].is_core and getattr(self, name) is not None]
        if len(cores) > 1:
            raise ValueError(f"a module has at most one core between B and A, got {cores}; fold one into B (scaled_B) first")
        for name, tensor in self.tensors().items():
            expected = FACTORS[name].shape(self.B.shape[0], self.A.shape[1], self.rank)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} to match the rank")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The factors present, by name (A and B always; a core when there is one)."""
        return {name: getattr(self, name) for name in FACTOR_NAMES if getattr(self, name) is not None}

    def core(self) -> tuple[str, torch.Tensor] | None:
        """(name, tensor) of the core between B and A, or None for plain LoRA."""
        return next(((name, t) for name, t in self.tensors().items() if FACTORS[name].is_core), None)

    def scaled_B(self) -> torch.Tensor:
        """B with the core folded in: B·diag(λ) (what AFLoRA uploads as B') or B·R; B for plain LoRA.

        With it every adapter is plain LoRA (scaled_B, A) exactly: what stacking, export and merging use."""
        core = self.core()
        return self.B if core is None else FACTORS[core[0]].folded(self.B, core[1])

    def delta(self) -> torch.Tensor:
        """The dense update ΔW = B · core · A."""
        return self.scaled_B() @ self.A

    def detach_clone(self) -> ModuleFactors:
        return ModuleFactors(**{name: t.detach().clone() for name, t in self.tensors().items()})


# One adapter: module name (as in model.named_modules()) -> its factors.
Adapter = dict[str, ModuleFactors]


def adapter_delta(adapter: Adapter) -> dict[str, torch.Tensor]:
    return {name: factors.delta() for name, factors in adapter.items()}


def stack_adapters(adapters: list[Adapter]) -> Adapter:
    """Concatenate along the rank: Σ_i B_i A_i == [B_1 … B_n][A_1; …; A_n] exactly.

    Used to merge several low-rank updates into one (FLoRA's stacking, and the exported
    global adapter that carries every round's merged update).
    """
    names = sorted({name for adapter in adapters for name in adapter})
    stacked: Adapter = {}
    for name in names:
        parts = [adapter[name] for adapter in adapters if name in adapter]
        stacked[name] = ModuleFactors(
            A=torch.cat([p.A for p in parts], dim=0),
            B=torch.cat([p.scaled_B() for p in parts], dim=1),
        )
    return stacked


def fresh_lora(shapes: dict[str, tuple[int, int]], rank: int, generator: torch.Generator) -> Adapter:
    """LoRA's standard start (as PEFT's default): A ~ U(−1/√n, 1/√n) (kaiming-uniform, a=√5), B = 0."""
    adapter: Adapter = {}
    for name, (m, n) in sorted(shapes.items()):
        bound = 1.0 / n**0.5
        A = (torch.rand(rank, n, generator=generator) * 2.0 - 1.0) * bound
        adapter[name] = ModuleFactors(A=A, B=torch.zeros(m, rank))
    return adapter


def tensor_key(kind: str, module: str) -> str:
    """Flat key for a module's tensor in a message ("B/model.layers.0.self_attn.q_proj"): a factor's name, or another
    per-module kind ("mask", "next_mask", "secagg_weight")."""
    return f"{kind}/{module}"


def split_key(key: str) -> tuple[str, str]:
    """(kind, module) of a message key: the inverse of `tensor_key`."""
    kind, _, module = key.partition("/")
    return kind, module


def adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Flat message form: "<factor>/<module>" for every factor present ("A/…", "B/…", and a core "lam/…" or "R/…")."""
    return {tensor_key(factor, name): tensor for name, factors in adapter.items() for factor, tensor in factors.tensors().items()}


def adapter_from_tensors(tensors: Mapping[str, torch.Tensor]) -> Adapter:
    """The adapter of every module with an "A/<module>" key, with whichever factors the message holds for it
    (other keys, e.g. AFLoRA's masks, are ignored)."""
    names = sorted(module for kind, module in map(split_key, tensors) if kind == "A")
    return {name: ModuleFactors(**{f: tensors[tensor_key(f, name)] for f in FACTOR_NAMES if tensor_key(f, name) in tensors})
            for name in names}
