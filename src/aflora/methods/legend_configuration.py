"""LEGEND's options, its cost model and its LoRA configuration algorithm ("LCD"): which top blocks each device
adapts and at which ranks. The method that trains and aggregates those configurations is methods/legend.py.

The flow, in order (formulas in docs/legend.md, "Cost model"):

    configure_devices         every device's DeviceConfig, once per run
      budgeted_client         a device given by its rank r_k gets the memory and uplink a full-depth rank-r_k LoRA costs
      deadline_seconds        the round deadline T shared by every device
      greedy_configuration    LCD: from d_min blocks at r_min, deepen or raise a rank while CostModel.costs fits
    capped_configurations     the labelled "capped" ablation (not LEGEND's algorithm)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..budgets import MB, LocalWorkload, ModelFootprint, budget_for_rank, training_flops
from ..lora.host import block_index
from .aggregation import ALPHA_RULE_HELP, LoRAScaling
from .base import ClientSpec

log = logging.getLogger(__name__)

DEADLINES = ("quantile", "straggler")
CONFIGURATIONS = {
    "lcd": "LEGEND's greedy LoRA configuration (depth and per-layer ranks) under the cost model",
    "capped": "NOT LEGEND's algorithm: every block at the largest candidate rank ≤ the client's federation.client_ranks "
              "entry (an ablation; needs no cost model)",
}
FLOAT32_BYTES = 4
TRAINING_BYTES_PER_PARAM = 16  # weights, gradients and two AdamW moments in fp32 (as aflora.budgets)
LORA_FACTORS = frozenset({"A", "B"})  # what every LEGEND device trains and uploads on its adapted modules


@dataclass
class LEGENDOptions(LoRAScaling):
    """LoRA scaling (lora_alpha, alpha_rule) defaults to FLoRA's reference: alpha = 2·r, i.e. α/r = 2 on every layer
    of every device, so one scaling per job is exact for layers of different ranks (docs/legend.md, "Scaling")."""

    ranks: list[int] = field(
        default_factory=lambda: [2, 4, 8, 16],
        metadata={"help": "Candidate per-layer ranks R; the smallest is r_min (every new layer), the largest r_max."},
    )
    min_depth: int = field(default=1, metadata={"help": "d_min: every device adapts at least this many top blocks."})
    lora_alpha: float = field(
        default=2.0, metadata={"help": "LoRA's alpha; with alpha_rule 'fixed' the scaling is lora_alpha / r of the device's top layer."}
    )
    alpha_rule: str = field(default="times_rank", metadata=ALPHA_RULE_HELP)
    configuration: str = field(
        default="lcd", metadata={"help": "; ".join(f"{name!r}: {meaning}" for name, meaning in CONFIGURATIONS.items())}
    )
    deadline: str = field(
        default="quantile",
        metadata={
            "help": "Round deadline T of the greedy: 'quantile' = the deadline_quantile-quantile of the devices' "
            "full-configuration times (every block at r_max); 'straggler' = the slowest device's time at the minimal "
            "configuration (d_min blocks at r_min)."
        },
    )
    deadline_quantile: float = field(default=0.5, metadata={"help": "q of the 'quantile' deadline, in [0, 1]."})
    device_tflops: float = field(
        default=1.0, metadata={"help": "Effective training throughput (TFLOP/s) of a device with compute_speed 1."}
    )
    uplink_window_seconds: float = field(
        default=10.0,
        metadata={"help": "Seconds in which a device can send its uplink_mb: bandwidth β_k = uplink_mb / this."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ranks, str):  # Flower's flat run-config carries lists as "2,4,8,16"
            self.ranks = [part.strip() for part in self.ranks.split(",") if part.strip()]
        try:
            ranks = [int(r) for r in self.ranks]
        except (TypeError, ValueError):
            raise ValueError(f"legend.ranks must be a list of integers such as [2, 4, 8, 16], got {self.ranks!r}") from None
        if not ranks or any(r < 1 for r in ranks) or len(set(ranks)) != len(ranks):
            raise ValueError(f"legend.ranks must be distinct integers ≥ 1, e.g. [2, 4, 8, 16]; got {self.ranks!r}")
        self.ranks = sorted(ranks)
        if self.min_depth < 1:
            raise ValueError(f"legend.min_depth must be ≥ 1 (every device trains at least one block), got {self.min_depth}")
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"legend.configuration must be one of {list(CONFIGURATIONS)}, got {self.configuration!r}")
        if self.deadline not in DEADLINES:
            raise ValueError(f"legend.deadline must be one of {list(DEADLINES)}, got {self.deadline!r}")
        if not 0.0 <= self.deadline_quantile <= 1.0:
            raise ValueError(f"legend.deadline_quantile must lie in [0, 1], got {self.deadline_quantile}")
        if self.device_tflops <= 0:
            raise ValueError(f"legend.device_tflops must be > 0, got {self.device_tflops}")
        if self.uplink_window_seconds <= 0:
            raise ValueError(f"legend.uplink_window_seconds must be > 0, got {self.uplink_window_seconds}")


# ---------------------------------------------------------------------------- configurations and their costs
@dataclass(frozen=True)
class DeviceConfig:
    """One device's LoRA depth and rank distribution, from the output down (blocks[0] is the top block)."""

    client_id: int
    blocks: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.ranks) or not self.blocks:
            raise ValueError(f"a LEGEND configuration needs one rank per adapted block, got blocks {self.blocks}, ranks {self.ranks}")

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def module_ranks(self, module_names: Sequence[str]) -> dict[str, int]:
        """Rank of every module inside the adapted blocks (modules of other blocks are absent: not trained)."""
        rank_of_block: dict[int | None, int] = dict(zip(self.blocks, self.ranks))
        return {name: rank_of_block[block_index(name)] for name in sorted(module_names) if block_index(name) in rank_of_block}


@dataclass(frozen=True)
class DeviceCosts:
    """Modeled costs of one configuration on one device (docs/legend.md, "Cost model")."""

    trained_params: int  # Σ_i s_{l_i} r_i
    compute_seconds: float
    upload_seconds: float
    memory_bytes: float
    uplink_bytes: int

    @property
    def round_seconds(self) -> float:
        return self.compute_seconds + self.upload_seconds


@dataclass(frozen=True)
class CostModel:
    """Deterministic per-device cost of a LoRA configuration: a simulation has no device to time."""

    footprint: ModelFootprint
    workload: LocalWorkload
    device_tflops: float = 1.0
    uplink_window_seconds: float = 10.0

    def rank_params(self, block: int) -> int:
        """s_l: parameters of one unit of rank in block l (A and B of every adapted module of the block)."""
        modules = [name for name in self.footprint.module_shapes if block_index(name) == block]
        return self.footprint.params_per_rank(LORA_FACTORS, modules)

    def costs(self, config: DeviceConfig, client: ClientSpec) -> DeviceCosts:
        foot, work = self.footprint, self.workload
        lora_params = sum(self.rank_params(block) * rank for block, rank in zip(config.blocks, config.ranks))
        # Backward only through the d adapted blocks of L (aflora.budgets.training_flops, as the fleet clock counts it)
        step_flops = training_flops(foot.base_params, lora_params, work.batch_size * work.seq_len, config.depth / foot.num_blocks)
        compute_seconds = work.local_steps * step_flops / (client.compute_speed * self.device_tflops * 1e12)
        uplink_bytes = FLOAT32_BYTES * lora_params  # A (r × in) and B (out × r) of every adapted module, fp32
        upload_seconds = 0.0
        if client.uplink_mb is not None:
            upload_seconds = uplink_bytes / (client.uplink_mb * MB / self.uplink_window_seconds)
        memory = (
            FLOAT32_BYTES * foot.base_params
            + TRAINING_BYTES_PER_PARAM * lora_params
            + foot.activation_bytes(work.batch_size, work.seq_len, blocks=config.depth)  # stored for d blocks only
        )
        return DeviceCosts(lora_params, compute_seconds, upload_seconds, memory, uplink_bytes)


def adapted_blocks(module_names: Sequence[str]) -> list[int]:
    """Transformer blocks that hold adaptable modules, from the output down (depth d = the first d of them)."""
    outside = [name for name in module_names if block_index(name) is None]
    if outside:
        raise ValueError(
            f"LEGEND places LoRA by transformer block, but {outside[:3]} are not inside a numbered block; "
            "set model.target_modules to layers inside the blocks (e.g. q_proj, v_proj)"
        )
    return sorted({block for name in module_names if (block := block_index(name)) is not None}, reverse=True)


def within_budgets(costs: DeviceCosts, client: ClientSpec, deadline_seconds: float) -> bool:
    """Every constraint of the greedy: round time ≤ T, memory ≤ M_k, upload ≤ the uplink budget."""
    return (
        costs.round_seconds <= deadline_seconds
        and (client.memory_mb is None or costs.memory_bytes <= client.memory_mb * MB)
        and (client.uplink_mb is None or costs.uplink_bytes <= client.uplink_mb * MB)
    )


def greedy_configuration(
    client: ClientSpec, blocks: Sequence[int], cost: CostModel, ranks: Sequence[int], min_depth: int, deadline_seconds: float
) -> DeviceConfig:
    """LCD for one device: from d_min blocks at r_min, (a) extend depth by one block at r_min if it fits, else
    (b) raise the highest layer that can take the next candidate rank without exceeding the layer above it and
    still fits; stop when neither move fits. Ranks stay non-increasing from the output down."""
    ranks = sorted(ranks)
    current = DeviceConfig(client.client_id, tuple(blocks[:min_depth]), (ranks[0],) * min_depth)
    start = cost.costs(current, client)
    if not within_budgets(start, client, float("inf")):
        raise ValueError(
            f"client {client.client_id} cannot train even {min_depth} block(s) at rank {ranks[0]} within its budgets "
            f"(that needs {start.memory_bytes / MB:.1f} MB of memory and {start.uplink_bytes / MB:.4f} MB of uplink; it has "
            f"{client.memory_mb} MB and {client.uplink_mb} MB); raise federation.memory_mb / uplink_mb (or, without budgets, its "
            f"federation.client_ranks entry {client.max_rank}, from which they are derived) or lower legend.ranks"
        )
    next_rank = dict(zip(ranks, ranks[1:]))
    while True:
        moves = []
        if current.depth < len(blocks):  # (a) one more block below, at r_min
            moves.append(DeviceConfig(client.client_id, tuple(blocks[: current.depth + 1]), current.ranks + (ranks[0],)))
        for i, rank in enumerate(current.ranks):  # (b) the highest raisable layer first
            raised = next_rank.get(rank)
            if raised is not None and (i == 0 or current.ranks[i - 1] >= raised):
                moves.append(DeviceConfig(client.client_id, current.blocks, current.ranks[:i] + (raised,) + current.ranks[i + 1:]))
        chosen = next((m for m in moves if within_budgets(cost.costs(m, client), client, deadline_seconds)), None)
        if chosen is None:
            return current
        current = chosen


def has_budgets(client: ClientSpec) -> bool:
    return client.memory_mb is not None or client.uplink_mb is not None


def budgeted_client(client: ClientSpec, cost: CostModel) -> ClientSpec:
    """A client given by its rank r_k (no memory_mb / uplink_mb) gets the memory and uplink that a rank-r_k LoRA on
    every target module of every block (A and B trained, like the other heterogeneous methods) costs it under
    aflora.budgets' model; its compute_speed stays. A client with a budget of its own keeps it."""
    if has_budgets(client):
        return client
    budget = budget_for_rank(cost.footprint, client.max_rank, trained=LORA_FACTORS, uploaded=LORA_FACTORS,
                             batch_size=cost.workload.batch_size, seq_len=cost.workload.seq_len)
    return dataclasses.replace(client, memory_mb=budget.memory_mb, uplink_mb=budget.uplink_mb)


def capped_configuration(client: ClientSpec, blocks: Sequence[int], ranks: Sequence[int]) -> DeviceConfig:
    """legend.configuration = "capped", an ablation that is not LEGEND's algorithm: every block, at the largest
    candidate rank ≤ max_rank (max_rank itself when it is below every candidate)."""
    allowed = [r for r in ranks if r <= client.max_rank]
    rank = max(allowed) if allowed else client.max_rank
    return DeviceConfig(client.client_id, tuple(blocks), (rank,) * len(blocks))


def deadline_seconds(clients: Sequence[ClientSpec], blocks: Sequence[int], cost: CostModel, options: LEGENDOptions) -> float:
    """T of the greedy (docs/legend.md, "Deadline")."""
    if options.deadline == "straggler":
        minimal = [DeviceConfig(c.client_id, tuple(blocks[: options.min_depth]), (options.ranks[0],) * options.min_depth) for c in clients]
        return max(cost.costs(config, c).round_seconds for config, c in zip(minimal, clients))
    full = [cost.costs(DeviceConfig(c.client_id, tuple(blocks), (options.ranks[-1],) * len(blocks)), c).round_seconds for c in clients]
    return float(torch.quantile(torch.tensor(full, dtype=torch.float64), options.deadline_quantile))


def configure_devices(
    clients: Sequence[ClientSpec], module_names: Sequence[str], options: LEGENDOptions, cost: CostModel | None = None
) -> dict[int, DeviceConfig]:
    """Each device's depth and rank distribution: the greedy LCD within each device's budgets (given, or derived
    from its rank by `budgeted_client`), or, only when legend.configuration = "capped", `capped_configuration`."""
    blocks = adapted_blocks(module_names)
    if options.min_depth > len(blocks):
        raise ValueError(f"legend.min_depth is {options.min_depth} but the model has only {len(blocks)} adapted blocks")
    if options.configuration == "capped":
        return capped_configurations(clients, blocks, options.ranks)
    if cost is None:
        raise ValueError(
            "LEGEND's configuration algorithm needs the cost model: pass footprint=ModelFootprint(...) and "
            "workload=LocalWorkload(...) to LEGEND (the runtime does), or set legend.configuration = \"capped\" for the "
            "full-depth, rank-capped ablation, which is not LEGEND's algorithm"
        )
    budgeted = [budgeted_client(client, cost) for client in clients]
    deadline = deadline_seconds(budgeted, blocks, cost, options)
    return {client.client_id: greedy_configuration(client, blocks, cost, options.ranks, options.min_depth, deadline)
            for client in budgeted}


def capped_configurations(clients: Sequence[ClientSpec], blocks: Sequence[int], ranks: Sequence[int]) -> dict[int, DeviceConfig]:
    """The "capped" ablation for every device; refused where devices have budgets, which it would ignore."""
    budgeted = [c.client_id for c in clients if has_budgets(c)]
    if budgeted:
        raise ValueError(
            f"legend.configuration = \"capped\" places LoRA by federation.client_ranks and would ignore the budgets of "
            f"clients {budgeted}; drop federation.memory_mb / uplink_mb, or use legend.configuration = \"lcd\""
        )
    log.warning("legend.configuration = \"capped\": every block at the client's capped rank; this is not LEGEND's algorithm")
    return {c.client_id: capped_configuration(c, blocks, ranks) for c in clients}
