"""LEGEND: the configuration algorithm against the cost formulas of docs/legend.md (recomputed here), layer-wise
aggregation against slice-by-slice references, what a job trains on a tiny model, and whole inline rounds."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from aflora.budgets import MB, LocalWorkload, ModelFootprint
from aflora.lora.factors import ModuleFactors
from aflora.methods.base import ClientSpec, tensor_key
from aflora.methods.legend import LEGEND
from aflora.methods.legend_configuration import CostModel, DeviceConfig, LEGENDOptions, budgeted_client, configure_devices

from helpers import run_inline, tiny_config

# ---------------------------------------------------------------------------- a hand-checkable model
P, L, HIDDEN, HEADS = 1_000_000, 4, 64, 4
SHAPES = {f"layers.{i}.{m}": shape for i in range(L) for m, shape in (("q", (64, 64)), ("v", (32, 64)))}
FOOT = ModelFootprint(base_params=P, module_shapes=SHAPES, num_blocks=L, hidden_size=HIDDEN, num_heads=HEADS)
BATCH, SEQ, STEPS = 4, 32, 2
WORK = LocalWorkload(BATCH, SEQ, STEPS)
S_BLOCK = (64 + 64) + (64 + 32)  # parameters per unit of rank in one block: A and B of q and v
ACT_BLOCK = 34 * SEQ * BATCH * HIDDEN + 5 * HEADS * SEQ**2 * BATCH  # activation bytes per block
TFLOPS, WINDOW = 1.0, 10.0
HUGE = 1e6  # MB: a budget that never binds


def reference_costs(ranks: tuple[int, ...], client: ClientSpec) -> tuple[float, float, float]:
    """(round seconds, memory bytes, uplink bytes) from the formulas in docs/legend.md."""
    d, lora = len(ranks), S_BLOCK * sum(ranks)
    tokens = BATCH * SEQ
    flops = 2 * P * tokens + 2 * (P / L) * tokens * d + 6 * lora * tokens
    seconds = STEPS * flops / (client.compute_speed * TFLOPS * 1e12)
    if client.uplink_mb is not None:
        seconds += 4 * lora / (client.uplink_mb * MB / WINDOW)
    memory = 4 * P + 16 * lora + d * ACT_BLOCK
    return seconds, memory, 4 * lora


def reference_fits(ranks, client, deadline) -> bool:
    seconds, memory, uplink = reference_costs(ranks, client)
    return seconds <= deadline * (1 + 1e-12) and memory <= client.memory_mb * MB and uplink <= client.uplink_mb * MB


def reference_quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] if lo + 1 >= len(xs) else xs[lo] + (pos - lo) * (xs[lo + 1] - xs[lo])


def device(cid: int, memory_mb: float = HUGE, uplink_mb: float = HUGE, speed: float = 1.0) -> ClientSpec:
    return ClientSpec(cid, max_rank=1, num_examples=10, memory_mb=memory_mb, uplink_mb=uplink_mb, compute_speed=speed)


def configure(clients, **options):
    return configure_devices(clients, list(SHAPES), LEGENDOptions(**options), CostModel(FOOT, WORK, TFLOPS, WINDOW))


# ---------------------------------------------------------------------------- the configuration algorithm
def test_uplink_bound_device_goes_deep_first_then_raises_ranks_from_the_top():
    # Alone in the fleet, the deadline is its own full-configuration time: only the uplink binds (Σr ≤ 12).
    config = configure([device(0, uplink_mb=4 * S_BLOCK * 12 / MB)])[0]
    # (2) → (2,2) → (2,2,2) → (2,2,2,2) → (4,2,2,2); 4→8 on top exceeds 12, so the next layer: (4,4,2,2).
    assert config.blocks == (3, 2, 1, 0) and config.ranks == (4, 4, 2, 2)


def test_memory_bound_device_stops_deepening_where_activations_run_out():
    memory = (4 * P + 2 * ACT_BLOCK + 16 * S_BLOCK * 20) / MB  # activations for 2 blocks, Σr ≤ 20
    config = configure([device(0, memory_mb=memory)])[0]
    # depth 3 never fits; ranks: (2,2) → (4,2) → (8,2) → (16,2) → (16,4), then 4→8 would need Σr = 24.
    assert config.blocks == (3, 2) and config.ranks == (16, 4)


def test_straggler_deadline_faster_devices_go_deeper():
    # T = the slowest device's time at one block of rank 2 (upload is negligible with these links).
    # speed 1.25: 2P + P/2·d + 1344·Σr ≤ 1.25·(2.5P + 2688) → depth 2, Σr ≤ 95 → (16, 16); speed 2 → everything.
    configs = configure([device(0, speed=1.0), device(1, speed=1.25), device(2, speed=2.0)], deadline="straggler")
    assert (configs[0].blocks, configs[0].ranks) == ((3,), (2,))
    assert (configs[1].blocks, configs[1].ranks) == ((3, 2), (16, 16))
    assert (configs[2].blocks, configs[2].ranks) == ((3, 2, 1, 0), (16, 16, 16, 16))


def test_more_bandwidth_buys_more_rank_under_a_shared_deadline():
    # Compute is negligible next to upload here: a 6.5× faster link uploads Σr ≤ 13 in the slow one's time (Σr = 2).
    slow, fast = device(0, uplink_mb=0.01, speed=1e6), device(1, uplink_mb=0.065, speed=1e6)
    configs = configure([slow, fast], deadline="straggler")
    assert configs[0].ranks == (2,)
    # (2,2,2,2) → (4,2,2,2) → top 4→8 would be 14, so (4,4,2,2) = 12; every further raise passes 13.
    assert configs[1].ranks == (4, 4, 2, 2)


GRID = [
    device(i, memory_mb=m, uplink_mb=u, speed=s)
    for i, (m, u, s) in enumerate(product((4.8, 5.3, 7.0), (0.004, 0.02, 0.2), (0.002, 0.01, 1.0)))
]


@pytest.mark.parametrize("deadline,q", [("quantile", 0.5), ("quantile", 0.8), ("straggler", 0.5)])
def test_configurations_respect_every_budget_and_are_greedy_maximal(deadline, q):
    configs = configure(GRID, deadline=deadline, deadline_quantile=q)
    if deadline == "straggler":
        T = max(reference_costs((2,), c)[0] for c in GRID)
    else:
        T = reference_quantile([reference_costs((16,) * L, c)[0] for c in GRID], q)
    next_rank = {2: 4, 4: 8, 8: 16}
    depths = set()
    for client in GRID:
        config = configs[client.client_id]
        depths.add(config.depth)
        assert config.blocks == tuple(range(L - 1, L - 1 - config.depth, -1)), "depth is counted from the output"
        assert list(config.ranks) == sorted(config.ranks, reverse=True), "ranks never grow towards the input"
        assert set(config.ranks) <= {2, 4, 8, 16}
        _, memory, uplink = reference_costs(config.ranks, client)
        assert memory <= client.memory_mb * MB and uplink <= client.uplink_mb * MB
        if config.ranks != (2,):  # the minimal configuration is granted even past the deadline
            assert reference_costs(config.ranks, client)[0] <= T * (1 + 1e-12)
        # Greedy maximality: no single move (one more block at r_min, one monotone rank raise) still fits.
        moves = [config.ranks + (2,)] if config.depth < L else []
        moves += [config.ranks[:i] + (next_rank[r],) + config.ranks[i + 1:] for i, r in enumerate(config.ranks)
                  if r in next_rank and (i == 0 or config.ranks[i - 1] >= next_rank[r])]
        assert not any(reference_fits(m, client, T) for m in moves), (client, config)
    assert len(depths) > 1, "the grid should produce heterogeneous depths"


def test_stronger_devices_never_get_a_smaller_configuration():
    """If device a has at least b's memory, uplink and speed, a is not both shallower and smaller than b."""
    configs = configure(GRID)
    for a, b in product(GRID, GRID):
        if a.memory_mb >= b.memory_mb and a.uplink_mb >= b.uplink_mb and a.compute_speed >= b.compute_speed:
            ca, cb = configs[a.client_id], configs[b.client_id]
            assert not (ca.depth < cb.depth and sum(ca.ranks) < sum(cb.ranks)), (a, ca, b, cb)


# ---------------------------------------------------------------------------- devices given by their ranks
# SmolLM2-135M's shapes, written down by hand (no model is loaded): 30 blocks, hidden 576, 9 heads; q_proj 576×576
# and v_proj 192×576 (out, in); P counts the tied embeddings once. The default run: batch 8, 128 tokens, 4 steps.
SMOL_P, SMOL_L, SMOL_HIDDEN, SMOL_HEADS = 134_515_008, 30, 576, 9
SMOL_SHAPES = {f"model.layers.{i}.self_attn.{m}": shape for i in range(SMOL_L)
               for m, shape in (("q_proj", (576, 576)), ("v_proj", (192, 576)))}
SMOL = ModelFootprint(SMOL_P, SMOL_SHAPES, SMOL_L, SMOL_HIDDEN, SMOL_HEADS)
SMOL_WORK = LocalWorkload(batch_size=8, seq_len=128, local_steps=4)
SMOL_S_BLOCK = (576 + 576) + (576 + 192)  # one unit of rank in one block: A (r × in) and B (out × r) of q and v
SMOL_ACT_BLOCK = 34 * 128 * 8 * SMOL_HIDDEN + 5 * SMOL_HEADS * 128**2 * 8  # activation bytes per block
DEFAULT_RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]  # federation.client_ranks


def full_depth_lora_bytes(rank: int) -> tuple[int, int]:
    """(memory, uplink) bytes of a rank-r LoRA on q and v of all 30 blocks, A and B trained, from aflora.budgets'
    model written out: fp32 weights + 16 bytes per LoRA parameter + every block's activations; 4 bytes per upload."""
    lora = SMOL_L * SMOL_S_BLOCK * rank
    return 4 * SMOL_P + 16 * lora + SMOL_L * SMOL_ACT_BLOCK, 4 * lora


def smol_method(clients, **options) -> LEGEND:
    method = LEGEND(LEGENDOptions(**options), module_shapes=SMOL_SHAPES, clients=clients, seed=0, footprint=SMOL, workload=SMOL_WORK)
    method.init_server_state()
    return method


@pytest.mark.parametrize("rank", sorted(set(DEFAULT_RANKS)))
def test_a_device_given_by_its_rank_gets_the_budget_of_a_full_depth_lora_of_that_rank(rank):
    client = ClientSpec(0, rank, 10, compute_speed=1.5)
    budgeted = budgeted_client(client, CostModel(SMOL, SMOL_WORK))
    memory, uplink = full_depth_lora_bytes(rank)
    assert (budgeted.memory_mb * MB, budgeted.uplink_mb * MB) == (memory, uplink)
    assert (budgeted.max_rank, budgeted.compute_speed) == (rank, 1.5)
    own = device(1, memory_mb=5.0, uplink_mb=0.5)  # a device with budgets of its own keeps them
    assert budgeted_client(own, CostModel(SMOL, SMOL_WORK)) == own


def test_legend_runs_its_own_configuration_on_rank_derived_budgets():
    """The default run gives ranks, not budgets: LEGEND still chooses depth and per-layer ranks (not a capped
    uniform rank), within what a full-depth rank-r_k LoRA would cost device k."""
    clients = [ClientSpec(cid, rank, 10) for cid, rank in enumerate(DEFAULT_RANKS)]
    method = smol_method(clients)
    cost = CostModel(SMOL, SMOL_WORK)
    for client in clients:
        config = method.configs[client.client_id]
        assert config.blocks == tuple(range(SMOL_L - 1, SMOL_L - 1 - config.depth, -1)), "LoRA starts at the output"
        assert list(config.ranks) == sorted(config.ranks, reverse=True), "ranks never grow towards the input"
        memory, uplink = full_depth_lora_bytes(client.max_rank)
        costs = cost.costs(config, client)
        assert costs.memory_bytes <= memory and costs.uplink_bytes <= uplink
        assert costs.uplink_bytes == 4 * SMOL_S_BLOCK * sum(config.ranks)
        if client.max_rank < 16:  # a budget below r_max everywhere: the top layers get r_max, the lowest less
            assert config.ranks[0] == 16 > config.ranks[-1], (client, config)
    # Only the uplink binds here (memory holds 30 blocks' activations, equal speeds meet the median deadline):
    # Σ r ≤ 30·r_k. Depth first at r_min = 2 (Σ 60), then ranks raised from the top. Rank 4 (Σ ≤ 120): four
    # layers 2→16 (116), the fifth 2→4 (118), the sixth 2→4 (120). Rank 8 (Σ ≤ 240): twelve layers at 16 (228),
    # the 13th 2→4→8 (234), the 14th 2→4→8 (240). Ranks 16 and above: every layer at r_max = 16.
    ranks = {client.max_rank: method.configs[client.client_id].ranks for client in clients}
    assert ranks[4] == (16,) * 4 + (4, 4) + (2,) * 24
    assert ranks[8] == (16,) * 12 + (8, 8) + (2,) * 16
    assert ranks[16] == ranks[32] == ranks[64] == (16,) * 30
    assert len(set(ranks.values())) == 3, "configurations differ by device where the budgets do"


def test_legend_on_heterogeneous_budgets_differs_by_device_and_fits():
    """Budgets given directly (rich, memory-poor, uplink-poor and slow devices) on SmolLM2's shapes."""
    memory, uplink = (size / MB for size in full_depth_lora_bytes(16))  # room for every block at r_max = 16
    few_blocks = (4 * SMOL_P + 3 * SMOL_ACT_BLOCK + 16 * SMOL_S_BLOCK * 48) / MB  # 3 blocks' activations, Σr ≤ 48
    clients = [
        ClientSpec(0, 1, 10, memory_mb=memory, uplink_mb=uplink),
        ClientSpec(1, 1, 10, memory_mb=few_blocks, uplink_mb=uplink),
        ClientSpec(2, 1, 10, memory_mb=memory, uplink_mb=uplink / 8),
        ClientSpec(3, 1, 10, memory_mb=memory, uplink_mb=uplink, compute_speed=0.05),
    ]
    method = smol_method(clients)
    cost = CostModel(SMOL, SMOL_WORK)
    configs = [method.configs[c.client_id] for c in clients]
    for client, config in zip(clients, configs):
        assert config.blocks == tuple(range(SMOL_L - 1, SMOL_L - 1 - config.depth, -1))
        assert list(config.ranks) == sorted(config.ranks, reverse=True)
        costs = cost.costs(config, client)
        assert costs.memory_bytes <= client.memory_mb * MB and costs.uplink_bytes <= client.uplink_mb * MB
    assert len({(c.blocks, c.ranks) for c in configs}) == len(configs), configs
    assert configs[0].ranks == (16,) * SMOL_L
    assert configs[1].ranks == (16, 16, 16), "activations for 3 blocks: depth 3, then ranks up to Σr = 48"
    assert configs[2].depth == SMOL_L and sum(configs[2].ranks) <= SMOL_L * 16 / 8, "a thin link: lower ranks"
    assert configs[3].depth < SMOL_L, "20× slower compute: the median deadline cuts backprop short"


def test_without_a_cost_model_legend_refuses_unless_the_capped_ablation_is_asked_for():
    clients = [ClientSpec(0, 8, 10), ClientSpec(1, 12, 10), ClientSpec(2, 1, 10)]
    with pytest.raises(ValueError, match=r'footprint=.*workload=.*legend.configuration = "capped"'):
        configure_devices(clients, list(SHAPES), LEGENDOptions())
    configs = configure_devices(clients, list(SHAPES), LEGENDOptions(configuration="capped"))
    assert [c.blocks for c in configs.values()] == [(3, 2, 1, 0)] * 3
    assert [c.ranks for c in configs.values()] == [(8,) * 4, (8,) * 4, (1,) * 4]  # largest candidate ≤ cap, or the cap


def test_the_capped_ablation_refuses_budgets_it_would_ignore():
    with pytest.raises(ValueError, match=r"would ignore the budgets of clients \[1\]"):
        configure_devices([ClientSpec(0, 8, 10), device(1)], list(SHAPES), LEGENDOptions(configuration="capped"))


def test_a_device_that_fits_nothing_is_named():
    with pytest.raises(ValueError, match=r"client 1 cannot train even 1 block\(s\) at rank 2"):
        configure([device(0), device(1, memory_mb=1.0)])


@pytest.mark.parametrize("options,message", [
    ({"ranks": [4, 4]}, "legend.ranks"), ({"ranks": []}, "legend.ranks"), ({"min_depth": 0}, "legend.min_depth"),
    ({"deadline": "soon"}, "legend.deadline"), ({"deadline_quantile": 1.5}, "legend.deadline_quantile"),
    ({"lora_alpha": 0}, "lora_alpha"), ({"alpha_rule": "sqrt"}, "alpha_rule"), ({"device_tflops": 0}, "legend.device_tflops"),
    ({"configuration": "uniform"}, "legend.configuration"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        LEGENDOptions(**options)


def test_rank_list_from_a_flat_run_config_string():
    assert LEGENDOptions(ranks="8, 2,4").ranks == [2, 4, 8]


# ---------------------------------------------------------------------------- layer-wise aggregation
SMALL = {f"layers.{i}.{m}": shape for i in range(3) for m, shape in (("q", (6, 5)), ("v", (4, 5)))}


def small_method(sizes=(30, 10, 20), **options) -> LEGEND:
    # no cost model here: the configurations are assigned by hand right below, so the capped start is only a placeholder
    method = LEGEND(LEGENDOptions(configuration="capped", **options), module_shapes=SMALL,
                    clients=[ClientSpec(i, 2, n) for i, n in enumerate(sizes)], seed=0)
    method.init_server_state()
    method.assign_configs({
        0: DeviceConfig(0, (2, 1), (4, 2)),
        1: DeviceConfig(1, (2,), (2,)),
        2: DeviceConfig(2, (2, 1, 0), (8, 4, 2)),
    })
    return method


def test_global_rank_is_the_largest_any_device_has_and_clients_get_prefix_slices():
    method = small_method()
    assert {n: f.rank for n, f in method.global_adapter().items()} == {
        "layers.0.q": 2, "layers.0.v": 2, "layers.1.q": 4, "layers.1.v": 4, "layers.2.q": 8, "layers.2.v": 8}
    assert method.client_ranks()[0] == {"layers.1.q": 2, "layers.1.v": 2, "layers.2.q": 4, "layers.2.v": 4}
    g = torch.Generator().manual_seed(0)
    for name, f in method.global_factors.items():
        method.global_factors[name] = ModuleFactors(A=torch.randn(f.A.shape, generator=g), B=torch.randn(f.B.shape, generator=g))
    instruction = method.instruct(0, round_=1)
    assert sorted(instruction.tensors) == sorted(tensor_key(k, n) for k in "AB" for n in method.client_ranks()[0])
    spec = method.local_job(instruction)
    for name, factors in spec.adapter.items():
        r = method.client_ranks()[0][name]
        assert torch.equal(factors.A, method.global_factors[name].A[:r])
        assert torch.equal(factors.B, method.global_factors[name].B[:, :r])


@pytest.mark.parametrize("options,expected", [
    ({}, {0: 2.0, 1: 2.0, 2: 2.0}),  # default alpha = 2·r (FLoRA's reference): α/r = 2 at every rank, every layer
    ({"lora_alpha": 16.0, "alpha_rule": "fixed"}, {0: 16 / 4, 1: 16 / 2, 2: 16 / 8}),  # PEFT's fixed alpha: 16 / top rank
])
def test_each_device_trains_with_the_scaling_of_its_rank(options, expected):
    method = small_method(**options)  # top-layer ranks: client 0 → 4, client 1 → 2, client 2 → 8
    assert {cid: method.local_job(method.instruct(cid, round_=1)).scaling for cid in (0, 1, 2)} == expected


def test_slice_wise_weighted_means_over_holders_and_untrained_parts_keep_their_value():
    method = small_method()
    g = torch.Generator().manual_seed(1)
    for name, f in method.global_factors.items():
        method.global_factors[name] = ModuleFactors(A=torch.randn(f.A.shape, generator=g), B=torch.randn(f.B.shape, generator=g))
    before = {n: f.detach_clone() for n, f in method.global_factors.items()}
    uploads, trained_by = [], {}
    for cid in (1, 0):  # client 2 (the only one with block 0 and slices 4..7 of block 2) sits this round out
        instruction = method.instruct(cid, round_=1)
        trained = {n: ModuleFactors(A=torch.randn(f.A.shape, generator=g), B=torch.randn(f.B.shape, generator=g))
                   for n, f in method.local_job(instruction).adapter.items()}
        trained_by[cid] = trained
        uploads.append(method.upload(instruction, trained, method.clients[cid].num_examples))
    method.aggregate(uploads, round_=1)

    ideal_sq = error_sq = 0.0
    for name, old in before.items():
        new = method.global_factors[name]
        assert new.rank == old.rank
        holders = [cid for cid in (0, 1) if name in trained_by[cid]]
        for j in range(old.rank):
            slice_holders = [cid for cid in holders if trained_by[cid][name].rank > j]
            if not slice_holders:
                assert torch.equal(new.A[j], old.A[j]) and torch.equal(new.B[:, j], old.B[:, j])
                continue
            total = sum(method.clients[cid].num_examples for cid in slice_holders)
            ref_A = sum(method.clients[cid].num_examples / total * trained_by[cid][name].A[j].double() for cid in slice_holders)
            ref_B = sum(method.clients[cid].num_examples / total * trained_by[cid][name].B[:, j].double() for cid in slice_holders)
            torch.testing.assert_close(new.A[j].double(), ref_A, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(new.B[:, j].double(), ref_B, rtol=1e-6, atol=1e-6)
        if holders:
            total = sum(method.clients[cid].num_examples for cid in holders)
            ideal = sum(method.clients[cid].num_examples / total * trained_by[cid][name].delta().double() for cid in holders)
            ideal_sq += float(ideal.pow(2).sum())
            error_sq += float((new.delta().double() - ideal).pow(2).sum())
    assert not any("layers.0" in n for u in uploads for n in u.ranks)
    assert method.aggregation_error() == pytest.approx((error_sq / ideal_sq) ** 0.5, rel=1e-6)
    assert method.aggregation_error() > 0  # averaging A and B apart is not averaging B·A


# ---------------------------------------------------------------------------- what a job trains
def test_job_trains_only_the_top_blocks_and_backprop_stops_above_the_rest(tiny_llama, tiny_host, token_batch):
    model, _ = tiny_llama
    shapes = tiny_host.module_shapes()
    method = LEGEND(LEGENDOptions(), module_shapes=shapes, clients=[ClientSpec(0, 4, 10)], seed=0,
                    footprint=tiny_host.footprint(), workload=LocalWorkload(2, 8, 1))
    method.init_server_state()
    method.assign_configs({0: DeviceConfig(0, (1,), (4,))})  # tiny-llama has blocks 0 and 1: adapt block 1 only
    g = torch.Generator().manual_seed(0)
    for name, f in method.global_factors.items():  # non-zero B so that A gets a gradient too
        method.global_factors[name] = ModuleFactors(A=f.A, B=torch.randn(f.B.shape, generator=g) * 0.1)
    spec = method.local_job(method.instruct(0, round_=1))
    assert sorted(spec.adapter) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

    tiny_host.install(spec.adapter, trainable=spec.trainable, scaling=spec.scaling)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(".layers.1." in n and (".lora_A." in n or ".lora_B." in n) for n in trainable)
    block_outputs = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda module, args, out, i=i: block_outputs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).requires_grad))
        for i in range(2)]
    try:
        model.zero_grad(set_to_none=True)
        model(input_ids=token_batch).logits.float().pow(2).mean().backward()
    finally:
        for hook in hooks:
            hook.remove()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        tiny_host.clear()
    assert block_outputs == {0: False, 1: True}, "the graph starts at the lowest adapted block"
    assert sorted(grads) == trainable and all(float(g.abs().sum()) > 0 for g in grads.values())


# ---------------------------------------------------------------------------- whole rounds
BUDGETS = ["federation.memory_mb=[4.0, 2.0, 1.504]", "federation.uplink_mb=[0.05, 0.02, 0.01]", "federation.compute_speed=[4.0, 2.0, 1.0]"]


def test_two_inline_rounds_with_heterogeneous_budgets(tmp_path):
    """The runtime hands LEGEND the model footprint and the local workload: budgets shape depth and ranks."""
    server = run_inline(tiny_config(tmp_path, 'method="legend"', *BUDGETS))
    uploads = {u.client_id: u for u in server.last_uploads}
    assert sorted(uploads) == [0, 1, 2]
    depths = {cid: len({n.split(".self_attn")[0] for n in u.ranks}) for cid, u in uploads.items()}
    assert depths[0] == 2 and depths[2] == 1, depths  # 1.504 MB: rank 2 on both blocks does not fit
    assert all(".layers.1." in n for n in uploads[2].ranks), "a shallow device adapts the block next to the output"
    for cid, upload in uploads.items():
        spec = server.method.clients[cid]
        assert sum(t.numel() * 4 for t in upload.tensors.values()) <= spec.uplink_mb * MB
        ranks = [upload.ranks[f"model.layers.{b}.self_attn.q_proj"] for b in (1, 0) if f"model.layers.{b}.self_attn.q_proj" in upload.ranks]
        assert ranks == sorted(ranks, reverse=True)
        assert server.method.client_ranks()[cid] == upload.ranks
    assert math.isfinite(server.last_diagnostics["aggregation_error"])
    metrics = server.evaluate()
    assert math.isfinite(metrics["loss"]) and 0.0 <= metrics["accuracy"] <= 1.0
