"""Client-side costs as the paper's Metrics paragraph defines them.

"Client-side costs are measured as the ratio between the number of parameters locally fine-tuned or
communicated from clients to the server, and the total number of parameters in the original LLM."
We report the fine-tuned count (the larger of the two for every method here: AFLoRA trains B and Λ
but uploads B·Λ) averaged over every (client, round) participation, and the uplink separately.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .methods.base import EVAL_PREFIX


def payload_params(tensors: Mapping[str, torch.Tensor]) -> int:
    """Floating-point parameters of the method's protocol in an upload (masks and evaluation-only tensors excluded)."""
    return sum(t.numel() for k, t in tensors.items() if t.is_floating_point() and not k.startswith(EVAL_PREFIX))


def payload_bytes(tensors: Mapping[str, torch.Tensor], *, evaluation_only: bool = False) -> int:
    """Bytes as sent (float32 = 4 bytes, bool masks = 1 byte per entry): the protocol's tensors, or with
    `evaluation_only` the tensors sent only so the server can evaluate a global model."""
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(EVAL_PREFIX) == evaluation_only)


def client_cost_pct(trained_params: Iterable[int], base_params: int) -> float:
    """Mean over participations of 100 · (parameters fine-tuned on the client) / (parameters of the base LLM)."""
    counts = list(trained_params)
    if not counts:
        return 0.0
    return 100.0 * sum(counts) / len(counts) / base_params
