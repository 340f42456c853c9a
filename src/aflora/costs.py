"""Client-side costs as the paper's Metrics paragraph defines them.

"Client-side costs are measured as the ratio between the number of parameters locally fine-tuned or
communicated from clients to the server, and the total number of parameters in the original LLM."
We report the fine-tuned count (the larger of the two for every method here: AFLoRA trains B and Λ
but uploads B·Λ) averaged over every (client, round) participation, and the uplink separately.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def payload_params(tensors: Mapping[str, torch.Tensor]) -> int:
    """Floating-point parameters in an upload (masks and other integer/bool metadata excluded)."""
    return sum(t.numel() for t in tensors.values() if t.is_floating_point())


def payload_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of every tensor in an upload as sent (float32 = 4 bytes, bool masks = 1 byte per entry)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def client_cost_pct(trained_params: Iterable[int], base_params: int) -> float:
    """Mean over participations of 100 · (parameters fine-tuned on the client) / (parameters of the base LLM)."""
    counts = list(trained_params)
    if not counts:
        return 0.0
    return 100.0 * sum(counts) / len(counts) / base_params
