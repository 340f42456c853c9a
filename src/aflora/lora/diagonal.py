"""Cores between LoRA's A and B as PEFT LoRA variants: diagonal Λ (ΔW = B Λ A, AFLoRA Eq. 6) and a full r × r R
(ΔW = B R A, Fed-SB / LoRA-SB).

PEFT's LoRA layers dispatch their math to a `LoraVariant` (that is how DoRA and KaSA are built). We register
one per core: a learnable per-adapter parameter between A and B, kept where `FACTORS` (aflora.lora.factors) says
(`lora_lambda`, `lora_core`). The rest of PEFT's machinery (injection, dropout, scaling, adapter switching) is
reused unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from .factors import FACTORS, Factor


@dataclass
class CoreLoraConfig(LoraConfig):
    diagonal: bool = field(
        default=False,
        metadata={"help": "Insert a learnable diagonal Λ between A and B (ΔW = B·diag(λ)·A).", "is_lora_variant": True},
    )
    full_core: bool = field(
        default=False,
        metadata={"help": "Insert a learnable r × r matrix R between A and B (ΔW = B·R·A, LoRA-SB).", "is_lora_variant": True},
    )


class CoreLoraVariant(LoraVariant):
    """A learnable core between A and B; a subclass names its factor and how the core acts on A·x."""

    factor: ClassVar[Factor]

    @staticmethod
    def apply_core(core: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """core · (A x) for a batch of rows A x (..., r)."""
        raise NotImplementedError

    @classmethod
    def init(cls, module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        attribute = cls.factor.peft_attribute
        if not hasattr(module, attribute):
            # Registering the name makes PEFT treat the core like lora_A/lora_B (device moves, deletion, state dict).
            setattr(module, attribute, nn.ParameterDict({}))
            module.adapter_layer_names = module.adapter_layer_names + (attribute,)
        weight = lora_weight(module.lora_A, adapter_name)
        m, n = module.out_features, module.in_features
        if m is None or n is None:
            raise ValueError(f"{type(module).__name__} reports no in/out features: a core variant needs a Linear layer")
        shape = cls.factor.shape(m, n, module.r[adapter_name])
        getattr(module, attribute)[adapter_name] = nn.Parameter(torch.zeros(shape, device=weight.device, dtype=weight.dtype))

    @classmethod
    def core(cls, module: LoraLayer, adapter: str) -> nn.Parameter:
        return getattr(module, cls.factor.peft_attribute)[adapter]

    @classmethod
    def delta_weight(cls, module: LoraLayer, adapter: str) -> torch.Tensor:
        folded = cls.factor.folded(lora_weight(module.lora_B, adapter), cls.core(module, adapter))
        return transpose(folded @ lora_weight(module.lora_A, adapter), cast(LoraLinear, module).fan_in_fan_out) * module.scaling[adapter]

    @classmethod
    def merge_safe(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + cls.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @classmethod
    def merge_unsafe(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += cls.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @classmethod
    def unmerge(cls, module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - cls.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @classmethod
    def forward(cls, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        core = cls.core(module, active_adapter)
        return result + lora_B(cls.apply_core(core, lora_A(dropout(x)))) * module.scaling[active_adapter]


def lora_weight(factors: nn.ModuleDict, adapter: str) -> torch.Tensor:
    """The weight of one adapter's lora_A or lora_B (PEFT keeps each as an nn.Linear in a ModuleDict)."""
    return cast(nn.Linear, factors[adapter]).weight


class DiagonalLoraVariant(CoreLoraVariant):
    factor = FACTORS["lam"]

    @staticmethod
    def apply_core(core: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        return ax * core


class FullCoreLoraVariant(CoreLoraVariant):
    factor = FACTORS["R"]

    @staticmethod
    def apply_core(core: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        return ax @ core.T  # rows: (R · A x)ᵀ = (A x)ᵀ Rᵀ


# Core factor name -> (CoreLoraConfig field that requests it, its variant).
CORE_VARIANTS: dict[str, tuple[str, type[CoreLoraVariant]]] = {
    DiagonalLoraVariant.factor.name: ("diagonal", DiagonalLoraVariant),
    FullCoreLoraVariant.factor.name: ("full_core", FullCoreLoraVariant),
}


def core_lora_config(core: str | None, **options: Any) -> CoreLoraConfig:
    """A CoreLoraConfig for plain LoRA (core None) or with the named core ("lam", "R")."""
    if core is not None and core not in CORE_VARIANTS:
        raise ValueError(f"no PEFT variant for core {core!r}; cores with one are {sorted(CORE_VARIANTS)}")
    flags: dict[str, Any] = {flag: name == core for name, (flag, _) in CORE_VARIANTS.items()}
    return CoreLoraConfig(**options, **flags)


class CoreLoraLinear(LoraLinear):
    """PEFT's LoRA Linear that also knows the core variants (for nn.Linear and GPT-2's Conv1D)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if isinstance(base_layer, Conv1D):
            # GPT-2 stores weights as (in, out); PEFT handles that with fan_in_fan_out.
            config.fan_in_fan_out = True
            kwargs["is_target_conv_1d_layer"] = True
        kwargs.pop("fan_in_fan_out", None)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {**super().lora_variants, **{(flag,): variant for flag, variant in CORE_VARIANTS.values()}}
