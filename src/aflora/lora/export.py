"""Saving the global adapter in PEFT's own format, and merging it into a standalone model.

The saved adapter is plain LoRA (no Λ: AFLoRA folds it into B), with a per-module rank and
alpha = rank so PEFT's scaling is 1; stock `PeftModel.from_pretrained` loads it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import save_file

from .factors import Adapter

PEFT_PREFIX = "base_model.model."


def save_peft_adapter(adapter: Adapter, out_dir: Path, *, base_model: str, conv1d_modules: Collection[str] = frozenset()) -> None:
    """Write adapter_config.json + adapter_model.safetensors for `adapter` (modules named as in the base model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {name: factors.rank for name, factors in adapter.items()}
    default_rank = max(ranks.values())
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_rank,
        target_modules=sorted(adapter),
        # PEFT matches these keys as regexes against module names; full names select one module each.
        rank_pattern={_exact(name): r for name, r in ranks.items()},
        alpha_pattern={_exact(name): r for name, r in ranks.items()},
        fan_in_fan_out=bool(conv1d_modules),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out_dir))
    tensors = {}
    for name, factors in adapter.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = factors.A.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = factors.scaled_B().detach().float().contiguous().cpu()
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})


def _exact(module_name: str) -> str:
    return re.escape(module_name)  # PEFT anchors it as (.*\.)?(name)$

