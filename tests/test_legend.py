"""LEGEND: the configuration algorithm against the cost formulas of docs/legend.md (recomputed here), layer-wise
aggregation against slice-by-slice references, what a job trains on a tiny model, and whole inline rounds."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from aflora.budgets import MB, ModelFootprint
from aflora.lora.factors import ModuleFactors
from aflora.methods.base import ClientSpec, tensor_key
from aflora.methods.legend import (
    LEGEND,
    CostModel,
    DeviceConfig,
    LEGENDOptions,
    LocalWorkload,
    configure_devices,
)

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


def test_devices_without_budgets_train_every_block_at_their_rank_cap():
    clients = [ClientSpec(0, 8, 10), ClientSpec(1, 12, 10), ClientSpec(2, 1, 10)]
    configs = configure_devices(clients, list(SHAPES), LEGENDOptions())
    assert [c.blocks for c in configs.values()] == [(3, 2, 1, 0)] * 3
    assert [c.ranks for c in configs.values()] == [(8,) * 4, (8,) * 4, (1,) * 4]  # largest candidate ≤ cap, or the cap


def test_a_device_that_fits_nothing_is_named():
    with pytest.raises(ValueError, match=r"client 1 cannot train even 1 block\(s\) at rank 2"):
        configure([device(0), device(1, memory_mb=1.0)])


@pytest.mark.parametrize("options,message", [
    ({"ranks": [4, 4]}, "legend.ranks"), ({"ranks": []}, "legend.ranks"), ({"min_depth": 0}, "legend.min_depth"),
    ({"deadline": "soon"}, "legend.deadline"), ({"deadline_quantile": 1.5}, "legend.deadline_quantile"),
    ({"lora_alpha": 0}, "legend.lora_alpha"), ({"device_tflops": 0}, "legend.device_tflops"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        LEGENDOptions(**options)


def test_rank_list_from_a_flat_run_config_string():
    assert LEGENDOptions(ranks="8, 2,4").ranks == [2, 4, 8]


# ---------------------------------------------------------------------------- layer-wise aggregation
SMALL = {f"layers.{i}.{m}": shape for i in range(3) for m, shape in (("q", (6, 5)), ("v", (4, 5)))}


def small_method(sizes=(30, 10, 20)) -> LEGEND:
    method = LEGEND(LEGENDOptions(), module_shapes=SMALL, clients=[ClientSpec(i, 2, n) for i, n in enumerate(sizes)], seed=0)
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
    instruction = method.instruct(0, round=1)
    assert sorted(instruction.tensors) == sorted(tensor_key(k, n) for k in "AB" for n in method.client_ranks()[0])
    spec = method.local_job(instruction)
    assert spec.scaling == 16.0 / 4  # lora_alpha / the top layer's rank
    for name, factors in spec.adapter.items():
        r = method.client_ranks()[0][name]
        assert torch.equal(factors.A, method.global_factors[name].A[:r])
        assert torch.equal(factors.B, method.global_factors[name].B[:, :r])


def test_slice_wise_weighted_means_over_holders_and_untrained_parts_keep_their_value():
    method = small_method()
    g = torch.Generator().manual_seed(1)
    for name, f in method.global_factors.items():
        method.global_factors[name] = ModuleFactors(A=torch.randn(f.A.shape, generator=g), B=torch.randn(f.B.shape, generator=g))
    before = {n: f.detach_clone() for n, f in method.global_factors.items()}
    uploads, trained_by = [], {}
    for cid in (1, 0):  # client 2 (the only one with block 0 and slices 4..7 of block 2) sits this round out
        instruction = method.instruct(cid, round=1)
        trained = {n: ModuleFactors(A=torch.randn(f.A.shape, generator=g), B=torch.randn(f.B.shape, generator=g))
                   for n, f in method.local_job(instruction).adapter.items()}
        trained_by[cid] = trained
        uploads.append(method.upload(instruction, trained, method.clients[cid].num_examples))
    method.aggregate(uploads, round=1)

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
    method = LEGEND(LEGENDOptions(), module_shapes=shapes, clients=[ClientSpec(0, 4, 10)], seed=0)
    method.init_server_state()
    method.assign_configs({0: DeviceConfig(0, (1,), (4,))})  # tiny-llama has blocks 0 and 1: adapt block 1 only
    g = torch.Generator().manual_seed(0)
    for name, f in method.global_factors.items():  # non-zero B so that A gets a gradient too
        method.global_factors[name] = ModuleFactors(A=f.A, B=torch.randn(f.B.shape, generator=g) * 0.1)
    spec = method.local_job(method.instruct(0, round=1))
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


def test_without_a_cost_model_every_device_trains_every_block_at_its_max_rank():
    """Constructed without footprint/workload (as in math tests): full depth at the max_rank cap."""
    shapes = {f"model.layers.{b}.self_attn.{m}": (8, 8) for b in (0, 1) for m in ("q_proj", "v_proj")}
    method = LEGEND(LEGENDOptions(), module_shapes=shapes, clients=[ClientSpec(0, 8, 5), ClientSpec(1, 3, 5)], seed=0)
    method.init_server_state()
    # the largest candidate rank (2, 4, 8, 16) not above the cap: 8 for max_rank 8, 2 for max_rank 3
    assert method.client_ranks() == {0: {n: 8 for n in shapes}, 1: {n: 2 for n in shapes}}
