"""Keeping every process's base model equal to the global one.

Some methods merge a low-rank update into the frozen base model after a round (AFLoRA's B_global·A',
FLoRA's stacked update). The server keeps them by round (`BaseMerges`), sends each client the ones it has
not confirmed (`BaseSync`, beside its instruction), and where server and clients share a disk also writes
them as files (`MergeStore`) that any process can catch up from. Torch and the adapter format only: the
message layer (aflora.flower.records) reads and writes these without loading the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from .lora.factors import Adapter, adapter_from_tensors, adapter_tensors, stack_adapters


@dataclass
class BaseSync:
    """What a client process needs to bring its copy of the base model up to the global one."""

    merges: dict[int, Adapter]  # the updates this client has not acknowledged yet, by round
    merged_rounds: list[int]  # every round whose update is in the global base model
    store: str = ""  # a folder holding every round's update, when server and clients share a disk (simulation)


class MergeStore:
    """Round updates as files (round_<t>.safetensors): a simulation's shared store, or a SuperNode's state-dir."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, round_: int) -> Path:
        return self.folder / f"round_{round_}.safetensors"

    def save(self, round_: int, adapter: Adapter) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(round_).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in adapter_tensors(adapter).items()}, tmp)
        tmp.replace(self.path(round_))

    def load(self, round_: int) -> Adapter | None:
        path = self.path(round_)
        return adapter_from_tensors(load_file(path)) if path.is_file() else None


@dataclass
class BaseMerges:
    """Low-rank updates merged into the base model, by round. Every process replays the ones it lacks."""

    by_round: dict[int, Adapter] = field(default_factory=dict)

    def since(self, round_exclusive: int) -> dict[int, Adapter]:
        return {r: a for r, a in sorted(self.by_round.items()) if r > round_exclusive}

    def exported_adapter(self, global_adapter: Adapter | None) -> Adapter | None:
        """All merged rounds plus the live global adapter as one adapter (exact: stacked along the rank)."""
        parts = [a for _, a in sorted(self.by_round.items())] + ([global_adapter] if global_adapter else [])
        return stack_adapters(parts) if parts else None

