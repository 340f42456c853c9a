"""Diagonal LoRA (ΔW = B Λ A, AFLoRA Eq. 6) as a PEFT LoRA variant.

PEFT's LoRA layers dispatch their math to a `LoraVariant` (that is how DoRA and KaSA are built).
We register one more: a learnable vector Λ (`lora_lambda`) between A and B. The rest of PEFT's
machinery (injection, dropout, scaling, adapter switching) is reused unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass
class DiagonalLoraConfig(LoraConfig):
    diagonal: bool = field(
        default=False,
        metadata={
            "help": "Insert a learnable diagonal Λ between A and B (ΔW = B·diag(λ)·A).",
            "is_lora_variant": True,
        },
    )


class DiagonalLoraVariant(LoraVariant):
    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        if not hasattr(module, "lora_lambda"):
            # Registering the name makes PEFT treat Λ like lora_A/lora_B (device moves, deletion, state dict).
            module.lora_lambda = nn.ParameterDict({})
            module.adapter_layer_names = module.adapter_layer_names + ("lora_lambda",)
        weight = module.lora_A[adapter_name].weight
        module.lora_lambda[adapter_name] = nn.Parameter(
            torch.zeros(module.r[adapter_name], device=weight.device, dtype=weight.dtype)
        )

    @staticmethod
    def delta_weight(module: LoraLinear, adapter: str) -> torch.Tensor:
        lam = module.lora_lambda[adapter]
        delta = (module.lora_B[adapter].weight * lam) @ module.lora_A[adapter].weight
        return transpose(delta, module.fan_in_fan_out) * module.scaling[adapter]

    @staticmethod
    def merge_safe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + DiagonalLoraVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += DiagonalLoraVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - DiagonalLoraVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any):
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        lam = module.lora_lambda[active_adapter]
        return result + lora_B(lora_A(dropout(x)) * lam) * module.scaling[active_adapter]


class DiagonalLoraLinear(LoraLinear):
    """PEFT's LoRA Linear that also knows the diagonal variant (for nn.Linear and GPT-2's Conv1D)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if isinstance(base_layer, Conv1D):
            # GPT-2 stores weights as (in, out); PEFT handles that with fan_in_fan_out.
            config.fan_in_fan_out = True
            kwargs["is_target_conv_1d_layer"] = True
        kwargs.pop("fan_in_fan_out", None)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {**super().lora_variants, ("diagonal",): DiagonalLoraVariant}
