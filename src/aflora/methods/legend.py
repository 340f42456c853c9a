"""LEGEND (Liu et al., arXiv 2412.20004, IEEE TMC 2025): per-device LoRA depth and rank distribution,
layer-wise aggregation.

Only the paper's abstract was available; every rule below that it does not state is marked in
docs/legend.md, which also gives the cost model's formulas. In short:
- Device k adapts the top d_k transformer blocks (counted from the output) with ranks r_{k,1} ≥ r_{k,2} ≥ …
  (position 1 = the block next to the output), drawn from a candidate set R. Blocks below carry no LoRA, so
  autograd never back-propagates below the lowest adapted block: that is LEGEND's compute saving.
- The server chooses (d_k, r_k) with a greedy LoRA configuration algorithm ("LCD"): start at d_min blocks of
  rank r_min; extend depth while the device's modeled round time, memory and upload fit; otherwise raise the
  rank of the highest layer that stays monotone; stop when no move fits (`configure_devices`; the options, the
  cost model and the algorithm live in methods/legend_configuration.py, this file is the method).
- Costs come from a deterministic model (FLOP-proportional compute ÷ compute_speed, upload bytes ÷ bandwidth,
  aflora.budgets' memory model with activations for d blocks only): a simulation has no device to time, so the
  paper's measured, EMA-smoothed status reports are omitted and configurations are computed once.
- A device given by its rank r_k instead of budgets (federation.client_ranks) gets the memory and uplink a
  full-depth rank-r_k LoRA costs it (`budgeted_client`); the greedy then spends those same resources its own way.
- Scaling: lora_alpha = 2·r (FLoRA's reference convention), so every layer's α/r is 2 whatever its rank.
- Aggregation is per module and per rank slice: slice j of a module is the |D_k|-weighted mean over the devices
  that trained it (r_{k,l} > j); slices and modules nobody trained keep their previous global value.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..lora.factors import Adapter, ModuleFactors, adapter_from_tensors, fresh_lora
from .aggregation import ProductError, data_weights, relative_error, weighted_sum
from .base import FederatedMethod, Instruction, TrainSpec, Upload, factor_shapes, factor_tensors, tensor_key
from .legend_configuration import LORA_FACTORS, CostModel, DeviceConfig, LEGENDOptions, adapted_blocks, configure_devices


class LEGEND(FederatedMethod):
    name = "legend"
    summary = "LEGEND (Liu et al. 2025): LoRA depth and ranks per device from its budgets, layer-wise aggregation"
    options_class = LEGENDOptions
    trained_factors = LORA_FACTORS
    uploaded_factors = LORA_FACTORS
    heterogeneous = True
    configures_from_budgets = True  # depth and per-layer ranks come from the budgets (configure_devices)
    exact_aggregation = False  # per-slice averages of A and B separately: not Σ p_k B_k A_k

    def __init__(self, options: LEGENDOptions, **kwargs) -> None:
        super().__init__(options, **kwargs)
        adapted_blocks(list(self.module_shapes))  # fail early on modules outside the blocks
        if (self.footprint is None) != (self.workload is None):
            raise ValueError("LEGEND's cost model needs both the model footprint and the local workload, or neither")
        self.cost: CostModel | None = None
        if self.footprint is not None and self.workload is not None:
            self.cost = CostModel(self.footprint, self.workload, options.device_tflops, options.uplink_window_seconds)

    # ------------------------------------------------------------------ server
    def init_server_state(self) -> None:
        self.global_factors: Adapter = {}
        self.configs: dict[int, DeviceConfig] = {}
        self._generator = torch.Generator().manual_seed(self.seed)
        self._error_terms: list[ProductError] = []
        # The inputs (budgets, speeds, the cost model) are static in a simulation: configure once.
        self.assign_configs(configure_devices(list(self.clients.values()), list(self.module_shapes), self.options, self.cost))

    def assign_configs(self, configs: Mapping[int, DeviceConfig]) -> None:
        """Adopt new device configurations; a module's global rank grows to the largest rank any device now has
        on it, the new slices starting as standard LoRA (A kaiming-uniform, B = 0). Trained slices are never dropped."""
        self.configs = dict(configs)
        wanted: dict[str, int] = {}
        for config in self.configs.values():
            for name, rank in config.module_ranks(list(self.module_shapes)).items():
                wanted[name] = max(wanted.get(name, 0), rank)
        for name, rank in sorted(wanted.items()):
            have = self.global_factors[name].rank if name in self.global_factors else 0
            if rank > have:
                fresh = fresh_lora({name: self.module_shapes[name]}, rank - have, self._generator)[name]
                if name in self.global_factors:
                    old = self.global_factors[name]
                    fresh = ModuleFactors(A=torch.cat([old.A, fresh.A]), B=torch.cat([old.B, fresh.B], dim=1))
                self.global_factors[name] = fresh

    def instruct(self, client_id: int, round_: int) -> Instruction:
        config = self.configs[client_id]
        tensors = {}
        for name, rank in config.module_ranks(list(self.module_shapes)).items():
            factors = self.global_factors[name]
            tensors[tensor_key("A", name)] = factors.A[:rank].clone()  # HetLoRA-style truncation to the first r slices
            tensors[tensor_key("B", name)] = factors.B[:, :rank].contiguous().clone()
        return Instruction(client_id=client_id, round=round_, tensors=tensors, config={"depth": config.depth})

    def aggregate(self, uploads: list[Upload], round_: int) -> None:
        uploads = sorted(uploads, key=lambda u: u.client_id)  # a fixed order keeps sums bit-reproducible
        self._error_terms = []
        for name, factors in self.global_factors.items():
            holders = [u for u in uploads if tensor_key("A", name) in u.tensors]
            if not holders:
                continue  # nobody trained this module: it keeps its previous global value
            A = [u.tensors[tensor_key("A", name)] for u in holders]
            B = [u.tensors[tensor_key("B", name)] for u in holders]
            ranks = [a.shape[0] for a in A]
            if max(ranks) > factors.rank:
                raise ValueError(f"{name}: a client uploaded rank {max(ranks)} but the global rank is {factors.rank}")
            new_A, new_B = factors.A.clone(), factors.B.clone()
            # Slices [low, high) between consecutive distinct ranks are held by the same devices (r_k ≥ high):
            # average them over exactly those, weighted by |D_k| (zero padding would dilute the higher slices).
            low = 0
            for high in sorted(set(ranks)):
                members = [i for i, r in enumerate(ranks) if r >= high]
                weights = data_weights([holders[i].num_examples for i in members])
                new_A[low:high] = weighted_sum([A[i][low:high] for i in members], weights)
                new_B[:, low:high] = weighted_sum([B[i][:, low:high] for i in members], weights)
                low = high
            self.global_factors[name] = ModuleFactors(A=new_A, B=new_B)
            # Ideal: Σ p_k B_k A_k over this module's holders, p_k = |D_k| normalized over them.
            weights = data_weights([u.num_examples for u in holders])
            self._error_terms.append(ProductError(new_B, new_A, [(float(p), b, a) for p, b, a in zip(weights, B, A)]))

    def aggregation_error(self) -> float | None:
        return relative_error(self._error_terms) if self._error_terms else None

    def global_adapter(self) -> Adapter | None:
        return self.global_factors

    def client_ranks(self) -> dict[int, dict[str, int]]:
        """Ranks of the modules each client trains; modules below its depth are absent (not rank 0)."""
        return {cid: config.module_ranks(list(self.module_shapes)) for cid, config in sorted(self.configs.items())}

    # ------------------------------------------------------------------ client
    def local_job(self, instruction: Instruction, local_state: dict[str, torch.Tensor] | None = None) -> TrainSpec:
        adapter = adapter_from_tensors(instruction.tensors)  # the top-d blocks' modules, as configured
        if not adapter:
            raise ValueError(f"LEGEND instruction for client {instruction.client_id} adapts no module")
        # The host takes one scaling per job. Under 'times_rank' (default) it is lora_alpha at every rank, exact for every
        # layer; under 'fixed' it is lora_alpha / the top layer's rank (the largest: ranks never grow downward).
        top_rank = max(f.rank for f in adapter.values())
        return TrainSpec(adapter=adapter, trainable=self.trained_factors, scaling=self.options.scaling(top_rank))

    def expected_upload(self, instruction: Instruction) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """A and B of exactly the modules (and ranks) the instruction configured: the top-d blocks."""
        ranks = {name: instruction.tensors[tensor_key("A", name)].shape[0]
                 for name in self.module_shapes if tensor_key("A", name) in instruction.tensors}
        return factor_shapes(self.module_shapes, self.uploaded_factors, ranks)

    def upload(self, instruction: Instruction, trained: Adapter, num_examples: int) -> Upload:
        tensors = factor_tensors(trained, ("A", "B"))
        return Upload(instruction.client_id, num_examples, tensors, {name: f.rank for name, f in trained.items()})
