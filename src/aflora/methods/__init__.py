"""Federated LoRA methods, selectable by name in configs."""

from __future__ import annotations

from typing import Any

from .aflora import AFLoRA
from .base import ClientSpec, FederatedMethod, Instruction, TrainSpec, Upload, options_from_mapping
from .fed_sb import FedSB
from .fedex_lora import FedExLoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .florist import FLoRIST
from .hetlora import HetLoRA
from .legend import LEGEND
from .shared_lora import FedIT, FedSALoRA, FFALoRA

METHODS: dict[str, type[FederatedMethod]] = {
    cls.name: cls for cls in (AFLoRA, FedExLoRA, FedIT, FedSB, FFALoRA, FedSALoRA, FLoRA, FLoRIST, FlexLoRA, HetLoRA, LEGEND)
}


def method_class(name: str) -> type[FederatedMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available methods are {sorted(METHODS)}")
    return METHODS[name]


def method_options(name: str, values: dict[str, Any]) -> Any:
    return options_from_mapping(method_class(name).options_class, values, section=name)


__all__ = ["METHODS", "ClientSpec", "FederatedMethod", "Instruction", "TrainSpec", "Upload", "method_class", "method_options"]
