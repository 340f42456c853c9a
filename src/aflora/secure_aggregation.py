"""Secure aggregation of AFLoRA's uploads: the server learns Σ_k p_k·pad(B'_k), never one client's B'.

SecAgg+ (Bell et al., CCS 2020; Flower's implementation, wired in by aflora.flower.secagg) sums
equal-shaped vectors of integers whose masks cancel only in the sum. AFLoRA's zero-padded B' are
equal-shaped (m × r_max per module) and Eq. 13 is a weighted *sum* of them, so the protocol fits once
every client multiplies its own contribution by its weight before masking:

1. server: p_k per module from what it already knows, client k's current mask (its rank r_k per module)
   and its data size |D_k| (ClientSpec): `method.secure_weights`, sent in the clear with the instruction
   (`attach_weights`).
2. client: trains as usual, then hands SecAgg+ p_k·pad(B'_k) per module (`fold_upload`); everything that
   is not secret (next_mask, num_examples, ranks, metrics) travels in the clear beside it.
3. SecAgg+ quantizes, masks, sums and unmasks Σ_{k∈S} p_k·pad(B'_k) over the set S of clients whose masked
   vectors arrived (`SecureSum`).
4. server: B_global = that sum / Σ_{k∈S} p_k (`method.aggregate_secure`). Without dropouts Σ p_k = 1 and
   this is Eq. 13; when clients drop out after their weights were sent it is Eq. 13 renormalised over the
   survivors, which is what plain aggregation computes over the clients that replied.

Quantization (Flower's `quantize`): every entry is clipped to [−c, c] and rounded stochastically to one of
T + 1 levels, step Δ = 2c/T, unbiased and off by less than one step. An entry of the sum over |S| clients
is therefore off by less than |S|·Δ, and an entry of B_global by less than |S|·Δ / Σ_{k∈S} p_k
(`error_bound`); with the defaults (c = 1, T = 2²²) Δ ≈ 4.8e-7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .lora.factors import split_key, tensor_key
from .methods.base import FederatedMethod, Instruction, Upload, validate_upload

WEIGHT = "secagg_weight"  # instruction tensors "secagg_weight/<module>": the client's p_k for that module
# SecAgg+ uploads every summand entry masked, as an int64 modulo 2^32 (Flower's pseudo_rand_gen draws int64
# masks): what a client really sends, recorded in its reply's metrics so uplink accounting stays honest.
MASKED_ENTRY_BYTES = 8


# ---------------------------------------------------------------------------- server → client
def attach_weights(instruction: Instruction, weights: Mapping[str, float]) -> None:
    """Put the client's p_k per module into its instruction (in the clear: the server computed them)."""
    for module, weight in weights.items():
        instruction.tensors[tensor_key(WEIGHT, module)] = torch.tensor(float(weight), dtype=torch.float64)


def read_weights(instruction: Instruction, modules: Sequence[str]) -> dict[str, float]:
    missing = [m for m in modules if tensor_key(WEIGHT, m) not in instruction.tensors]
    if missing:
        raise RuntimeError(
            f"a SecAgg+ round reached client {instruction.client_id}, but its instruction carries no weight for "
            f"{missing[:3]}: the server must run with secagg.enabled = true (the same experiment config as the clients)"
        )
    return {m: float(instruction.tensors[tensor_key(WEIGHT, m)]) for m in modules}


# ---------------------------------------------------------------------------- client
def summand_order(method: FederatedMethod) -> list[str]:
    """The modules in the order their summands travel (SecAgg+ sums a list of arrays, position by position)."""
    return sorted(method.module_shapes)


def is_summed(method: FederatedMethod, key: str) -> bool:
    """Whether an upload tensor reaches the server only inside the sum (AFLoRA: B'), not in the clear."""
    return split_key(key)[0] in method.uploaded_factors


def clear_part(method: FederatedMethod, upload: Upload) -> Upload:
    """The upload without its summed tensors: what the server reads in the clear."""
    return replace(upload, tensors={k: t for k, t in upload.tensors.items() if not is_summed(method, k)},
                   metrics=dict(upload.metrics), local_state={})


def fold_upload(method: FederatedMethod, instruction: Instruction, upload: Upload,
                clipping_range: float) -> tuple[list[torch.Tensor], Upload]:
    """(p_k·pad(B'_k) per module in `summand_order`, the clear part of the upload).

    SecAgg+ clips every entry to ±clipping_range without telling anyone; the clear part reports how many
    entries that touched (metric `secagg_clipped`), so the server can warn. Non-finite values are refused
    here: inside the masked sum nobody could see where they came from."""
    modules = summand_order(method)
    summands = method.secure_summands(instruction, upload, read_weights(instruction, modules))
    ordered = [summands[m] for m in modules]
    for module, tensor in zip(modules, ordered):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"client {upload.client_id}: the update of {module} holds NaN or Inf values; not sent")
    clear = clear_part(method, upload)
    clear.metrics["secagg_clipped"] = float(sum(int((t.abs() > clipping_range).sum()) for t in ordered))
    entries = sum(t.numel() for t in ordered)
    clear.metrics["secagg_uplink_params"] = float(entries)
    clear.metrics["secagg_uplink_bytes"] = float(entries * MASKED_ENTRY_BYTES)
    return ordered, clear


# ---------------------------------------------------------------------------- server
@dataclass
class SecureSum:
    """What SecAgg+ revealed: Σ_{k∈S} p_k·pad(B'_k) per module, and S (the clients whose vectors are in it)."""

    vectors: dict[str, torch.Tensor]
    client_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_arrays(cls, method: FederatedMethod, arrays: Sequence, client_ids: Sequence[int]) -> SecureSum:
        modules = summand_order(method)
        if len(arrays) != len(modules):
            raise ValueError(f"SecAgg+ returned {len(arrays)} arrays for {len(modules)} modules")
        return cls({m: torch.as_tensor(a, dtype=torch.float64) for m, a in zip(modules, arrays)}, sorted(client_ids))


class _ClearView:
    """`method` as `validate_upload` sees it when only the clear part of a reply arrives."""

    def __init__(self, method: FederatedMethod) -> None:
        self.method = method

    def expected_upload(self, instruction: Instruction):
        return {k: v for k, v in self.method.expected_upload(instruction).items() if not is_summed(self.method, k)}

    def check_upload(self, upload: Upload, instruction: Instruction) -> str | None:
        return self.method.check_upload(upload, instruction)


def validate_clear_upload(method: FederatedMethod, upload: Upload, instruction: Instruction) -> str | None:
    """`validate_upload` for the clear part of a SecAgg+ reply, plus: the client's data size must be the one
    its weight was computed from (the weight is already inside the sum)."""
    reason = validate_upload(_ClearView(method), upload, instruction)  # type: ignore[arg-type]
    spec = method.clients.get(upload.client_id)
    if reason is None and spec is not None and upload.num_examples != spec.num_examples:
        reason = (f"reports {upload.num_examples} examples, but its weight was computed for the {spec.num_examples} "
                  "of its partition: server and client disagree on the data (same config and data files on both?)")
    return reason


def quantization_step(clipping_range: float, quantization_range: int) -> float:
    """Δ = 2c/T: the distance between two of SecAgg+'s integer levels, in the units of the summed values."""
    return 2.0 * clipping_range / quantization_range


def error_bound(num_summed: int, clipping_range: float, quantization_range: int, weight_total: float = 1.0) -> float:
    """Largest error of an entry of B_global = sum / Σ_{k∈S} p_k: each of the |S| clients' stochastic rounding
    is off by less than one step Δ (clipping aside, which clients report)."""
    return num_summed * quantization_step(clipping_range, quantization_range) / weight_total
