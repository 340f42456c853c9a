"""Low-rank factors as plain tensors: the currency between clients, server and methods.

Every method reads and writes adapters in one scale-free convention, ΔW = B · diag(λ) · A, so that
aggregation math never has to know about LoRA's alpha/r scaling (the host folds it in and out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModuleFactors:
    """Factors of one adapted weight matrix W (out_features × in_features)."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)
    lam: torch.Tensor | None = None  # (rank,) diagonal Λ; None means the identity

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"low-rank factors do not fit together: A is {tuple(self.A.shape)}, B is {tuple(self.B.shape)}; "
                "expected A (rank × in_features) and B (out_features × rank) with the same rank"
            )
        if self.lam is not None and self.lam.shape != (self.rank,):
            raise ValueError(f"Λ has shape {tuple(self.lam.shape)}, expected ({self.rank},) to match the rank")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def scaled_B(self) -> torch.Tensor:
        """B · diag(λ): what AFLoRA uploads as B' (Λ folded into B's columns)."""
        return self.B if self.lam is None else self.B * self.lam

    def delta(self) -> torch.Tensor:
        """The dense update ΔW = B · diag(λ) · A."""
        return self.scaled_B() @ self.A

    def detach_clone(self) -> ModuleFactors:
        lam = None if self.lam is None else self.lam.detach().clone()
        return ModuleFactors(self.A.detach().clone(), self.B.detach().clone(), lam)


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


def adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Flat message form: "A/<module>", "B/<module>" and, for Λ-LoRA, "lam/<module>"."""
    flat = {}
    for name, factors in adapter.items():
        flat[f"A/{name}"], flat[f"B/{name}"] = factors.A, factors.B
        if factors.lam is not None:
            flat[f"lam/{name}"] = factors.lam
    return flat


def adapter_from_tensors(tensors: dict[str, torch.Tensor]) -> Adapter:
    names = sorted(key.split("/", 1)[1] for key in tensors if key.startswith("A/"))
    return {name: ModuleFactors(A=tensors[f"A/{name}"], B=tensors[f"B/{name}"], lam=tensors.get(f"lam/{name}")) for name in names}
