"""FLoRIST, FedEx-LoRA and rank-partitioned column weights on tiny tensors, against computations written here
(numpy's SVD of the dense aggregate, a dense base-model update, hand-computed weights)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from test_baselines_math import SHAPES, fedavg_weights, ideal, make, trained_randomly

from aflora.costs import payload_params
from aflora.methods import METHODS, method_options
from aflora.methods.aggregation import pad_columns, weighted_sum
from aflora.methods.base import ClientSpec, Upload, tensor_key


def run_round(method, round_, generator):
    runs = [trained_randomly(method, cid, round_, generator) for cid in sorted(method.clients)]
    method.aggregate([r[3] for r in runs], round_=round_)
    return runs


def resumed(method):
    """A fresh instance given the method's server state through a torch.save round trip (aflora.checkpoint's way)."""
    fresh = type(method)(method.options, module_shapes=method.module_shapes, clients=list(method.clients.values()), seed=method.seed)
    constructed = set(vars(fresh))
    buffer = io.BytesIO()
    torch.save({k: v for k, v in vars(method).items() if k not in constructed}, buffer)
    buffer.seek(0)
    vars(fresh).update(torch.load(buffer, weights_only=False))
    return fresh


# ---------------------------------------------------------------------------- FLoRIST
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_florist_update_is_the_svd_truncation_of_the_dense_aggregate_at_the_energy_rank(threshold):
    g = torch.Generator().manual_seed(11)
    sizes, ranks = [10, 20, 30], [8, 4, 2]
    method = make("florist", ranks, sizes, energy_threshold=threshold)
    runs = run_round(method, 1, g)
    p = fedavg_weights(sizes)
    update = method.round_merge()
    dropped, total, chosen = 0.0, 0.0, []
    for name in SHAPES:
        dense = ideal(p, [r[2] for r in runs], name).numpy()
        U, S, Vt = np.linalg.svd(dense, full_matrices=False)
        share = np.cumsum(S**2) / np.sum(S**2)
        k = int(np.argmax(share >= threshold)) + 1  # the fewest singular values whose energy reaches τ
        assert update[name].rank == k
        assert share[k - 1] >= threshold and (k == 1 or share[k - 2] < threshold)
        truncation = (U[:, :k] * S[:k]) @ Vt[:k]
        np.testing.assert_allclose(update[name].delta().double().numpy(), truncation, rtol=1e-5, atol=1e-6)
        dropped, total = dropped + float(np.sum(S[k:] ** 2)), total + float(np.sum(S**2))
        chosen.append(k)
    diagnostics = method.round_diagnostics()
    assert diagnostics["truncation_loss"] == pytest.approx((dropped / total) ** 0.5, rel=1e-6)
    assert diagnostics["truncation_loss"] ** 2 <= 1 - threshold + 1e-9  # kept energy ≥ τ over all modules too
    assert diagnostics["global_rank"] == pytest.approx(sum(chosen) / len(chosen))
    assert method.aggregation_error() < 1e-6  # the stacked aggregate, before truncation, is exact


def test_florist_at_full_energy_keeps_the_exact_aggregate_and_downloads_less_than_flora():
    g = torch.Generator().manual_seed(12)
    sizes, ranks = [10, 30], [6, 6]
    method = make("florist", ranks, sizes, energy_threshold=1.0)
    runs = run_round(method, 1, g)
    for name, (m, n) in SHAPES.items():
        torch.testing.assert_close(method.round_merge()[name].delta().double(), ideal(fedavg_weights(sizes), [r[2] for r in runs], name),
                                   rtol=1e-5, atol=1e-6)
        assert method.round_merge()[name].rank <= min(m, n) < sum(ranks)  # FLoRA would send rank Σ r_k = 12
    assert method.round_diagnostics()["truncation_loss"] < 1e-6


def test_florist_uploads_a_and_b_of_fresh_adapters_and_its_state_survives_a_checkpoint():
    g = torch.Generator().manual_seed(13)
    method = make("florist", [4, 2], [5, 5])
    runs = run_round(method, 1, g)
    for (_, spec, _, upload), rank in zip(runs, [4, 2]):
        assert all(f.rank == rank and torch.count_nonzero(f.B) == 0 for f in spec.adapter.values())  # fresh each round
        assert payload_params(upload.tensors) == sum(rank * (m + n) for m, n in SHAPES.values())
    again = resumed(method)
    assert again.round_diagnostics() == method.round_diagnostics()
    for name in SHAPES:
        assert torch.equal(again.round_merge()[name].B, method.round_merge()[name].B)
    with pytest.raises(ValueError, match="energy_threshold"):
        make("florist", [4], [1], energy_threshold=0.0)


# ---------------------------------------------------------------------------- FedEx-LoRA
def test_fedex_base_plus_residual_plus_mean_adapter_equals_the_exact_average():
    g = torch.Generator().manual_seed(14)
    sizes = [10, 30, 60]
    method = make("fedex_lora", [8, 4, 4], sizes)
    base = {name: torch.randn(m, n, generator=g, dtype=torch.float64) for name, (m, n) in SHAPES.items()}
    p = fedavg_weights(sizes)
    for round_ in (1, 2):
        instructions = {cid: method.instruct(cid, round_) for cid in method.clients}
        runs = run_round(method, round_, g)
        for cid, (_, spec, _, upload) in enumerate(runs):  # clients start from the global (Ā, B̄)
            assert set(upload.tensors) == {tensor_key(f, n) for f in "AB" for n in SHAPES}  # uplink: A and B only
            assert all(torch.equal(spec.adapter[n].B, instructions[cid].tensors[tensor_key("B", n)]) for n in SHAPES)
        squared_residual, squared_ideal = 0.0, 0.0
        for name in SHAPES:
            trained = [r[2][name] for r in runs]
            mean_A, mean_B = sum(w * f.A.double() for w, f in zip(p, trained)), sum(w * f.B.double() for w, f in zip(p, trained))
            torch.testing.assert_close(method.global_adapter()[name].A.double(), mean_A)  # FedAvg of A and of B
            torch.testing.assert_close(method.global_adapter()[name].B.double(), mean_B)
            exact = ideal(p, [r[2] for r in runs], name)
            before = base[name]
            base[name] = before + method.round_merge()[name].delta().double()  # the residual, merged into W
            model = base[name] + method.global_adapter()[name].delta().double()  # what every client evaluates
            torch.testing.assert_close(model, before + exact, rtol=1e-5, atol=1e-5)
            squared_residual += float(torch.linalg.norm(exact - mean_B @ mean_A) ** 2)
            squared_ideal += float(torch.linalg.norm(exact) ** 2)
        residual_norm = method.round_diagnostics()["residual_norm"]
        assert residual_norm == pytest.approx((squared_residual / squared_ideal) ** 0.5, rel=1e-5)
        assert residual_norm > 0.05  # FedIT's error, which a FedEx without the residual would keep
        assert method.aggregation_error() < 1e-6
    assert METHODS["fedex_lora"].heterogeneous is False and method.rank == 4


def test_fedex_state_survives_a_checkpoint():
    method = make("fedex_lora", [4, 4], [1, 3])
    run_round(method, 1, torch.Generator().manual_seed(15))
    again = resumed(method)
    assert again.round_diagnostics() == method.round_diagnostics()
    for name in SHAPES:
        assert torch.equal(again.round_merge()[name].A, method.round_merge()[name].A)
        assert torch.equal(again.global_adapter()[name].B, method.global_adapter()[name].B)


# ---------------------------------------------------------------------------- rank-partitioned column weights
# One module of shape 1 × 1, so every rank slice is a number: client k's B and A hold the values below.
SIZES = [10, 30, 60]  # p = 0.1, 0.3, 0.6
VALUES = [[1.0], [2.0, 4.0], [3.0, 6.0, 9.0]]  # ranks 1, 2, 3
# Slice 0 is held by all three (0.1, 0.3, 0.6), slice 1 by clients 1 and 2 (30/90, 60/90), slice 2 by client 2 (1).
RANK_PARTITIONED = [0.1 * 1 + 0.3 * 2 + 0.6 * 3, (1 / 3) * 4 + (2 / 3) * 6, 1.0 * 9]  # = [2.5, 5.333, 9]


def make_on_one_number(name, ranks, **options):
    method = METHODS[name](method_options(name, options), module_shapes={"m": (1, 1)},
                           clients=[ClientSpec(i, r, n) for i, (r, n) in enumerate(zip(ranks, SIZES))], seed=0)
    method.init_server_state()
    return method


def test_hetlora_rank_partitioned_slices_are_means_over_their_holders():
    method = make_on_one_number("hetlora", [1, 2, 3], column_weights="rank_partitioned")
    uploads = [Upload(cid, SIZES[cid], {"A/m": torch.tensor(v)[:, None], "B/m": torch.tensor(v)[None, :],
                                        "next_rank": torch.tensor(len(v))}, {"m": len(v)}) for cid, v in enumerate(VALUES)]
    method.aggregate(uploads, round_=1)
    torch.testing.assert_close(method.global_factors["m"].B, torch.tensor([RANK_PARTITIONED]))
    torch.testing.assert_close(method.global_factors["m"].A, torch.tensor(RANK_PARTITIONED)[:, None])
    # Its own product Σ_k B_k diag(q_k) A_k = Σ_j Σ_k q_kj b_kj a_kj, against B_g A_g = Σ_j (Σ_k q_kj b_kj)²
    own = (0.1 * 1 + 0.3 * 4 + 0.6 * 9) + ((1 / 3) * 16 + (2 / 3) * 36) + 81
    assert method.aggregation_error() == pytest.approx(abs(sum(x * x for x in RANK_PARTITIONED) - own) / own, rel=1e-5)


def test_aflora_rank_partitioned_columns_follow_the_masks():
    method = make_on_one_number("aflora", [1, 2, 3], column_weights="rank_partitioned")
    method.masks[2]["m"] = torch.tensor([True, False, True])  # client 2 pruned column 1: client 1 alone holds it
    kept = [[1.0], [2.0, 4.0], [3.0, 9.0]]
    uploads = [Upload(cid, SIZES[cid], {"B/m": torch.tensor(v)[None, :], "next_mask/m": method.masks[cid]["m"].clone()}, {"m": len(v)})
               for cid, v in enumerate(kept)]
    method.aggregate(uploads, round_=1)
    torch.testing.assert_close(method.B_global["m"], torch.tensor([[0.1 * 1 + 0.3 * 2 + 0.6 * 3, 4.0, 9.0]]))
    assert method.aggregation_error() < 1e-6  # A is shared, so per-column weights keep the aggregate exact


def test_aflora_default_weights_are_unchanged_eq_12():
    method = make_on_one_number("aflora", [1, 2, 3])
    uploads = [Upload(cid, SIZES[cid], {"B/m": torch.tensor(v)[None, :], "next_mask/m": method.masks[cid]["m"].clone()}, {"m": len(v)})
               for cid, v in enumerate(VALUES)]
    raw = [math.log(2) * 10, math.log(3) * 30, math.log(4) * 60]  # log(1 + r_k)·|D_k|
    p = torch.tensor([x / sum(raw) for x in raw], dtype=torch.float64)
    expected = weighted_sum([pad_columns(u.tensors["B/m"], method.masks[u.client_id]["m"], 3) for u in uploads], p)
    method.aggregate(uploads, round_=1)
    assert torch.equal(method.B_global["m"], expected)  # bit for bit: the option leaves the default path as it was


def test_rank_partitioned_is_refused_where_one_weight_per_client_is_needed():
    method = make_on_one_number("aflora", [1, 2, 3], column_weights="rank_partitioned")
    with pytest.raises(ValueError, match="SecAgg"):
        method.secure_weights([0, 1, 2])
    method.use_uniform_weights()  # client-level DP
    uploads = [Upload(cid, SIZES[cid], {"B/m": torch.tensor(v)[None, :], "next_mask/m": method.masks[cid]["m"].clone()}, {"m": len(v)})
               for cid, v in enumerate(VALUES)]
    with pytest.raises(ValueError, match="DP"):
        method.aggregate(uploads, round_=1)
    with pytest.raises(ValueError, match="hetlora.column_weights must be one of"):
        make_on_one_number("hetlora", [1], column_weights="per_rank")
