"""One frozen base model per process, with client or server adapters swapped onto it.

Simulated clients never copy the model: each installs its own low-rank factors into the same
PEFT LoRA layers (sized to its rank), trains, reads them back and leaves. Memory per client is
its adapter only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterator, Sequence
from typing import Any, cast

import torch
from peft import inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..budgets import ModelFootprint
from .diagonal import CoreLoraConfig, CoreLoraLinear, core_lora_config
from .factors import FACTORS, Adapter, ModuleFactors, check_factor_names

ADAPTER_NAME = "aflora"
ADAPTABLE_LAYERS = (nn.Linear, Conv1D)  # the layer types LoRA factors attach to


def find_target_modules(model: nn.Module, target_modules: Sequence[str], layers: Collection[int] | None = None) -> list[str]:
    """Full names of the Linear/Conv1D modules whose last name part is in `target_modules`.

    `layers` optionally keeps only modules inside those transformer blocks (LEGEND's depth).
    """
    wanted = set(target_modules)
    names = []
    for name, module in model.named_modules():
        targeted = isinstance(module, ADAPTABLE_LAYERS) and name.rsplit(".", 1)[-1] in wanted
        if targeted and (layers is None or block_index(name) in layers):
            names.append(name)
    if not names:
        raise ValueError(
            f"none of the target modules {list(target_modules)} is a Linear layer of this model; "
            f"its Linear layers are named {adaptable_layer_names(model)}. Set model.target_modules to some of those."
        )
    return names


def adaptable_layer_names(model: nn.Module) -> list[str]:
    """The names model.target_modules can use: last name parts of the Linear (and GPT-2 Conv1D) layers."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, ADAPTABLE_LAYERS)})


def block_index(module_name: str) -> int | None:
    """Index of the transformer block a module lives in ("model.layers.7.self_attn.q_proj" -> 7)."""
    match = re.search(r"\.(\d+)\.", f".{module_name}.")
    return int(match.group(1)) if match else None


def backward_fraction(module_names: Collection[str], num_blocks: int) -> float:
    """Share of the base's blocks a backward pass crosses when only `module_names` train: autograd stops at the
    lowest adapted block (LEGEND's top-d blocks: d / L). 1.0 when any module lies outside the numbered blocks."""
    blocks = [block_index(name) for name in module_names]
    if not blocks or None in blocks or not num_blocks:
        return 1.0
    return (num_blocks - min(b for b in blocks if b is not None)) / num_blocks


class AdapterHost:
    """Holds the shared base model and the currently installed adapter."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str]) -> None:
        self.model = model
        for param in model.parameters():
            param.requires_grad_(False)
        self.module_names = find_target_modules(model, target_modules)
        config = self._lora_config(core=None)
        config._register_custom_module({nn.Linear: CoreLoraLinear, Conv1D: CoreLoraLinear})
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        self.layers: dict[str, LoraLayer] = {name: cast(LoraLayer, model.get_submodule(name)) for name in self.module_names}
        self.installed: set[str] = set()  # modules of the adapter now on the model
        self.clear()
        self.base_param_count = sum(p.numel() for p in self._base_parameters())

    # ------------------------------------------------------------------ shapes
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every adaptable module."""
        shapes = {name: (layer.out_features, layer.in_features) for name, layer in self.layers.items()}
        unknown = sorted(name for name, (m, n) in shapes.items() if m is None or n is None)
        if unknown:
            raise ValueError(f"PEFT reports no in/out features for {unknown[:3]}; adapt Linear (or GPT-2 Conv1D) layers only")
        return {name: (int(m), int(n)) for name, (m, n) in shapes.items() if m is not None and n is not None}

    def footprint(self) -> ModelFootprint:
        """The model facts the device-budget model needs (aflora.budgets)."""
        config: Any = self.model.config  # a transformers PretrainedConfig
        return ModelFootprint(
            base_params=self.base_param_count,
            module_shapes=self.module_shapes(),
            num_blocks=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
        )

    # ------------------------------------------------------------------ adapters
    def install(self, adapter: Adapter, *, trainable: Collection[str] = (), scaling: float = 1.0) -> None:
        """Put `adapter` on the model; the factors named in `trainable` (names of aflora.lora.factors.FACTORS) get gradients.

        `scaling` is LoRA's alpha/r: the layer computes scaling·B·A, so B is stored divided by it and
        `read()` multiplies it back — adapters outside the host stay scale-free.
        """
        unknown = set(adapter) - set(self.layers)
        if unknown:
            raise KeyError(f"adapter has modules this model does not adapt: {sorted(unknown)[:3]}")
        check_factor_names(trainable, "trainable")
        self.clear()
        for name, factors in adapter.items():
            layer = self.layers[name]
            core = factors.core()
            config = self._lora_config(core=None if core is None else core[0])
            layer.update_layer(ADAPTER_NAME, factors.rank, lora_alpha=factors.rank, config=config)
            layer.scaling[ADAPTER_NAME] = scaling
            layer.set_adapter(ADAPTER_NAME)
            with torch.no_grad():
                params = self._factor_params(layer)
                for key, tensor in factors.tensors().items():
                    params[key].copy_(tensor / scaling if key == "B" else tensor)
            for key, param in params.items():
                param.requires_grad_(key in trainable)
        self.installed = set(adapter)

    def clear(self) -> None:
        """Remove the adapter: the model computes exactly its (merged) base weights."""
        for layer in self.layers.values():
            if ADAPTER_NAME in layer.lora_A:
                layer.delete_adapter(ADAPTER_NAME)
        self.installed = set()

    def read(self) -> Adapter:
        """Detached copies of the installed factors, in the scale-free convention."""
        adapter: Adapter = {}
        for name in sorted(self.installed):
            layer = self.layers[name]
            values = {key: param.detach().clone() for key, param in self._factor_params(layer).items()}
            values["B"] = values["B"] * layer.scaling[ADAPTER_NAME]
            adapter[name] = ModuleFactors(**values)
        return adapter

    def factor_parameters(self) -> dict[str, dict[str, nn.Parameter]]:
        """Live parameters of the installed adapter (for optimizers and regularizers)."""
        return {name: self._factor_params(self.layers[name]) for name in sorted(self.installed)}

    # ------------------------------------------------------------------ base weights
    def merge_into_base(self, adapter: Adapter) -> None:
        """W ← W + B·core·A for every module of `adapter` (the round's global update, Eq. 1)."""
        with torch.no_grad():
            for name, factors in adapter.items():
                weight = self._stored_base_weight(name)
                delta = factors.delta().to(device=weight.device, dtype=weight.dtype)
                weight.add_(delta.T if self.is_conv1d(name) else delta)

    def base_weight(self, name: str) -> torch.Tensor:
        """The base weight of one module as (out_features, in_features)."""
        weight = self._stored_base_weight(name)
        return weight.T if self.is_conv1d(name) else weight

    def _stored_base_weight(self, name: str) -> torch.Tensor:
        """The base layer's weight parameter as stored ((in, out) for GPT-2's Conv1D)."""
        weight = self.layers[name].get_base_layer().weight
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"the base layer of {name} has no weight tensor (got {type(weight).__name__})")
        return weight

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Evaluation mode without gradients; restores the training flag afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _factor_params(self, layer: LoraLayer) -> dict[str, nn.Parameter]:
        """The installed factors of one layer, by name, wherever FACTORS says PEFT keeps them."""
        params = {}
        for name, factor in FACTORS.items():
            held = getattr(layer, factor.peft_attribute, {})
            if ADAPTER_NAME in held:
                entry = held[ADAPTER_NAME]
                # lora_A/lora_B are Linear layers, the cores plain parameters
                params[name] = cast(nn.Parameter, entry.weight if isinstance(entry, nn.Module) else entry)
        return params

    def is_conv1d(self, name: str) -> bool:
        return isinstance(self.layers[name].get_base_layer(), Conv1D)

    def _base_parameters(self) -> Iterator[nn.Parameter]:
        seen: set[int] = set()
        for name, param in self.model.named_parameters():
            if "lora_" in name or id(param) in seen:  # tied embeddings are one parameter
                continue
            seen.add(id(param))
            yield param

    def _lora_config(self, *, core: str | None) -> CoreLoraConfig:
        return core_lora_config(
            core,
            r=1,
            lora_alpha=1,
            lora_dropout=0.0,
            target_modules=list(self.module_names),
            init_lora_weights=False,  # every factor is copied in by install()
        )
