"""Client-level differential privacy for the uploads (central DP with client-side clipping).

- Each client clips its whole upload (for AFLoRA: B' = B·Λ of every module, jointly) to L2 norm C.
- The server aggregates with uniform weights 1/m over the m accepted clients, so adding or removing one
  client moves the aggregate by at most C/m, and adds Gaussian noise of standard deviation σ·C/m to every
  entry of the aggregate (AFLoRA: B_global). Data-dependent weights (|D_k|, log(1+r_k)) would leak through
  the weights themselves and break that bound, so DP mode replaces them.
- ε at the configured δ is accounted with Flower's RDP accountant (client-level, add-or-remove-one), one
  Gaussian release per round; with client sampling below 1 the accountant is told the sampling
  (without replacement), which amplifies privacy.

The noise is drawn from a generator seeded by (seed, round), so a resumed run stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .methods.base import EVAL_PREFIX


def upload_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """Joint L2 norm of an upload's protocol tensors (masks and evaluation-only tensors excluded)."""
    squares = [t.double().pow(2).sum() for k, t in tensors.items() if t.is_floating_point() and not k.startswith(EVAL_PREFIX)]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def clip_upload(tensors: dict[str, torch.Tensor], clip_norm: float) -> float:
    """Scale the upload in place so its joint L2 norm is at most `clip_norm`; returns the norm before clipping."""
    norm = upload_norm(tensors)
    if norm > clip_norm:
        factor = clip_norm / norm
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not key.startswith(EVAL_PREFIX):
                tensors[key] = tensor * factor
    return norm


def noise_std(noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """σ·C/m: the Gaussian mechanism's standard deviation for an average of m clipped updates."""
    return noise_multiplier * clip_norm / num_clients


class PrivacyLedger:
    """ε spent so far, one Gaussian release per round (Flower's RDP accountant)."""

    def __init__(self, *, noise_multiplier: float, delta: float, population: int, sampled: bool) -> None:
        # Imported here, not with the module: runs without DP then need no Flower (the in-process transport,
        # e.g. bench/device/run.sh on a machine that has no flwr).
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.population = population
        sampling = SamplingMethod.WITHOUT_REPLACEMENT if sampled else SamplingMethod.NO_AMPLIFICATION
        # The accountant supports add-or-remove neighbours without amplification, replace-one with sampling.
        relation = NeighboringRelation.REPLACE_ONE if sampled else NeighboringRelation.ADD_OR_REMOVE_ONE
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=population, neighboring_relation=relation, sampling_method=sampling,
        ))
        self.releases: list[int] = []  # clients per release, so a checkpoint can replay the accounting

    def release(self, num_clients: int) -> float:
        """Compose this round's release; the cumulative ε at δ (∞ without noise)."""
        self.releases.append(num_clients)
        if self.noise_multiplier <= 0:
            return float("inf")
        from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, num_clients, self.population))
        return float(self.accountant.get_epsilon(self.delta))

    def replay(self, releases: list[int]) -> None:
        for num_clients in releases:
            self.release(num_clients)
