"""AFLoRA's server math on random tensors, checked against independent computations."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from aflora.lora.factors import ModuleFactors
from aflora.methods.aflora import AFLoRA, AFLoRAOptions, normalize_rows, prune_ranks
from aflora.methods.aggregation import pad_columns, rank_aware_weights
from aflora.methods.base import ClientSpec, tensor_key

SHAPES = {"layer.0.q": (24, 20), "layer.0.v": (12, 20), "layer.1.q": (24, 20)}


def make_method(ranks, sizes, seed=0, **options) -> AFLoRA:
    clients = [ClientSpec(cid, r, n) for cid, (r, n) in enumerate(zip(ranks, sizes))]
    method = AFLoRA(AFLoRAOptions(**options), module_shapes=SHAPES, clients=clients, seed=seed)
    method.init_server_state()
    return method


def random_training(method: AFLoRA, client_id: int, round_: int, generator: torch.Generator):
    """A client's round with 'training' replaced by random B and Λ (the math must hold for any values)."""
    instruction = method.instruct(client_id, round_)
    spec = method.local_job(instruction)
    trained = {
        name: ModuleFactors(A=f.A, B=torch.randn(f.B.shape, generator=generator), lam=torch.randn(f.rank, generator=generator))
        for name, f in spec.adapter.items()
    }
    return instruction, trained, method.upload(instruction, trained, method.clients[client_id].num_examples)


def test_zero_padded_aggregate_equals_ideal_aggregation():
    """Σ_k p_k pad(B'_k) · A_global == Σ_k p_k B_k Λ_k A_k with A_k the client's rows of A (Sec. V-D)."""
    generator = torch.Generator().manual_seed(1)
    ranks, sizes = [8, 4, 2, 4], [50, 10, 30, 7]
    method = make_method(ranks, sizes)
    # Give clients 1 and 3 non-trivial masks first, so padding has holes, not just a prefix.
    method.masks[1] = {n: torch.tensor([True, False, True, True]) for n in SHAPES}
    method.masks[3] = {n: torch.tensor([False, True, False, True]) for n in SHAPES}
    A_before = {n: a.clone() for n, a in method.A_global.items()}
    runs = [random_training(method, cid, 1, generator) for cid in range(len(ranks))]
    method.aggregate([upload for _, _, upload in runs], round_=1)

    for name in SHAPES:
        kept_ranks = [trained[name].rank for _, trained, _ in runs]
        raw = [math.log(1 + r) * n for r, n in zip(kept_ranks, sizes)]
        p = [x / sum(raw) for x in raw]
        assert sum(p) == pytest.approx(1.0, abs=1e-12)
        ideal = sum(
            p_k * (trained[name].B.double() @ torch.diag(trained[name].lam.double()) @ instruction.tensors[tensor_key("A", name)].double())
            for p_k, (instruction, trained, _) in zip(p, runs)
        )
        aggregated = method.B_global[name] @ A_before[name]
        assert aggregated.dtype == torch.float32
        torch.testing.assert_close(aggregated.double(), ideal, rtol=1e-6, atol=1e-6 * float(ideal.abs().max()))


def test_client_rows_of_A_are_the_kept_prefix_rows():
    method = make_method([8, 4], [10, 10])
    method.masks[1] = {n: torch.tensor([True, False, False, True]) for n in SHAPES}
    instruction = method.instruct(1, round_=1)
    for name in SHAPES:
        expected = method.A_global[name][[0, 3]]
        assert torch.equal(instruction.tensors[tensor_key("A", name)], expected)


def test_rank_aware_weights_hand_computed_and_sum_to_one():
    weights = rank_aware_weights([64, 4], [100, 300])
    a, b = math.log(65) * 100, math.log(5) * 300
    assert weights.tolist() == pytest.approx([a / (a + b), b / (a + b)], rel=1e-12)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)


def test_data_only_weights_when_rank_awareness_is_off():
    generator = torch.Generator().manual_seed(3)
    method = make_method([8, 2], [30, 10], rank_aware_weights=False)
    runs = [random_training(method, cid, 1, generator) for cid in range(2)]
    A = {n: a.clone() for n, a in method.A_global.items()}
    method.aggregate([u for _, _, u in runs], round_=1)
    name = "layer.0.v"
    ideal = sum(w * (t[name].B @ torch.diag(t[name].lam) @ i.tensors[tensor_key("A", name)]) for w, (i, t, _) in zip([0.75, 0.25], runs))
    torch.testing.assert_close(method.B_global[name] @ A[name], ideal, rtol=1e-5, atol=1e-5)


def test_pad_columns_places_columns_by_mask_and_appends_zeros():
    B = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    padded = pad_columns(B, torch.tensor([False, True, False, True]), width=6)
    assert padded.tolist() == [[0, 1, 0, 2, 0, 0], [0, 3, 0, 4, 0, 0]]
    with pytest.raises(ValueError, match="columns"):
        pad_columns(B, torch.tensor([True, True, True]), width=6)


def test_global_A_rows_have_norm_C_before_and_after_a_round():
    generator = torch.Generator().manual_seed(4)
    method = make_method([4, 2], [5, 5], a_row_norm=2.5)
    for A in method.A_global.values():
        torch.testing.assert_close(A.norm(dim=1), torch.full((A.shape[0],), 2.5))
    runs = [random_training(method, cid, 1, generator) for cid in range(2)]
    method.aggregate([u for _, _, u in runs], round_=1)

    def trainer(spec):  # a stand-in for public-data tuning: any change to A
        return {n: ModuleFactors(A=f.A * 3.0 + 1.0, B=f.B) for n, f in spec.adapter.items()}

    method.server_update(trainer)
    for A in method.A_global.values():
        torch.testing.assert_close(A.norm(dim=1), torch.full((A.shape[0],), 2.5))


def test_alpha_fusion_and_the_merged_update_use_B_global():
    """Eq. 11: A' = α·A + (1−α)·A_FT, and the round's merged update is B_global · A'."""
    generator = torch.Generator().manual_seed(5)
    method = make_method([4, 4], [5, 5], alpha=0.25)
    runs = [random_training(method, cid, 1, generator) for cid in range(2)]
    method.aggregate([u for _, _, u in runs], round_=1)
    A = {n: a.clone() for n, a in method.A_global.items()}
    A_ft = {n: torch.randn(a.shape, generator=generator) for n, a in A.items()}
    seen_trainable = []

    def trainer(spec):
        seen_trainable.append(spec.trainable)
        return {n: ModuleFactors(A=A_ft[n], B=f.B) for n, f in spec.adapter.items()}

    method.server_update(trainer)
    assert seen_trainable == [frozenset({"A"})]
    update = method.round_merge()
    for name in SHAPES:
        expected_A = 0.25 * A[name] + 0.75 * A_ft[name]
        torch.testing.assert_close(update[name].A, expected_A)
        torch.testing.assert_close(update[name].delta(), method.B_global[name] @ expected_A)


def test_without_server_tuning_the_trainer_is_not_called():
    method = make_method([2, 2], [5, 5], server_tuning=False)
    generator = torch.Generator().manual_seed(6)
    method.aggregate([random_training(method, cid, 1, generator)[2] for cid in range(2)], round_=1)
    A = {n: a.clone() for n, a in method.A_global.items()}
    method.server_update(lambda spec: pytest.fail("server tuning is off"))
    for name in SHAPES:
        torch.testing.assert_close(method.round_merge()[name].A, A[name])


# ---------------------------------------------------------------------------- DDR (Eq. 8-9)
def test_prune_ranks_hand_computed_case():
    values = [1.0, 1.1, 0.9, 0.001]
    sigma = statistics.pstdev(values)  # population std, computed outside torch
    assert sigma == pytest.approx(0.43832, abs=1e-5)
    lambda_sq = torch.tensor(values)
    assert prune_ranks(lambda_sq, beta=1.0).tolist() == [True, True, True, False]  # threshold 0.438
    assert prune_ranks(lambda_sq, beta=2.1).tolist() == [True, True, False, False]  # threshold 0.920
    assert prune_ranks(lambda_sq, beta=2.4).tolist() == [False, True, False, False]  # threshold 1.052
    # threshold 1.315 would prune everything: the largest dimension is kept (min_rank = 1)
    assert prune_ranks(lambda_sq, beta=3.0).tolist() == [False, True, False, False]


def test_prune_ranks_beta_zero_keeps_all_and_single_dimension_survives():
    assert prune_ranks(torch.tensor([0.0, 5.0, 0.1]), beta=0.0).all()
    assert prune_ranks(torch.tensor([0.0]), beta=10.0).tolist() == [True]


def test_prune_ranks_never_below_min_rank():
    lambda_sq = torch.tensor([0.0, 1.0, 4.0, 0.5])
    keep = prune_ranks(lambda_sq, beta=100.0, min_rank=2)
    assert keep.tolist() == [False, True, True, False]


def test_masks_only_shrink_over_rounds_and_uploads_have_kept_columns():
    generator = torch.Generator().manual_seed(7)
    method = make_method([16, 8], [20, 20], beta=0.8)
    previous = {cid: {n: m.clone() for n, m in masks.items()} for cid, masks in method.masks.items()}
    for round_ in range(1, 6):
        runs = [random_training(method, cid, round_, generator) for cid in range(2)]
        for instruction, _trained, upload in runs:
            for name, (m, _) in SHAPES.items():
                kept = int(instruction.tensors[tensor_key("mask", name)].sum())
                assert upload.tensors[tensor_key("B", name)].shape == (m, kept)
                assert upload.ranks[name] == kept
        method.aggregate([u for _, _, u in runs], round_=round_)
        for cid, masks in method.masks.items():
            for name, mask in masks.items():
                assert not (mask & ~previous[cid][name]).any(), "a pruned dimension came back"
                assert mask.sum() >= 1
        previous = {cid: {n: m.clone() for n, m in masks.items()} for cid, masks in method.masks.items()}
    assert any(int(m.sum()) < 16 for m in method.masks[0].values()), "random λ should have triggered some pruning"


def test_without_ddr_ranks_stay_fixed():
    generator = torch.Generator().manual_seed(8)
    method = make_method([8, 4], [10, 10], ddr=False)
    for round_ in (1, 2):
        method.aggregate([random_training(method, cid, round_, generator)[2] for cid in range(2)], round_=round_)
    assert {cid: set(r.values()) for cid, r in method.client_ranks().items()} == {0: {8}, 1: {4}}


@pytest.mark.parametrize("bad", [{"beta": -0.1}, {"alpha": 1.5}, {"alpha": -0.01}, {"gamma": -1.0}, {"a_row_norm": -1.0}])
def test_bad_options_are_rejected_with_the_field_name(bad):
    (field, _), = bad.items()
    with pytest.raises(ValueError, match=f"aflora.{field}"):
        AFLoRAOptions(**bad)


def test_default_row_norm_is_sqrt_in_features():
    method = make_method([4, 2], [5, 5])
    for name, A in method.A_global.items():
        torch.testing.assert_close(A.norm(dim=1), torch.full((A.shape[0],), SHAPES[name][1] ** 0.5))


def test_normalize_rows():
    A = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(normalize_rows(A, 1.0), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_relative_error_of_an_exact_aggregate_is_a_real_zero():
    from aflora.methods.aggregation import combine_error_terms

    error = combine_error_terms([(-1e-15, 4.0), (2e-16, 1.0)])  # rounding can make the trace identity slightly negative
    assert isinstance(error, float) and error == 0.0


@pytest.mark.parametrize("rank", [4, 400])
def test_the_norm_of_stacked_factors_costs_at_most_the_dense_product(rank):
    """ProductError stacks every client's factors: R grows with the clients. Through the R × R Gram matrices alone the
    aggregation error cost R²·(m + n), quadratic in the clients; above R·(m + n) = m·n it takes the product instead."""
    from torch.utils.flop_counter import FlopCounterMode

    from aflora.methods.aggregation import low_rank_frobenius_sq

    generator = torch.Generator().manual_seed(0)
    U, V = torch.randn(64, rank, generator=generator), torch.randn(rank, 48, generator=generator)
    with FlopCounterMode(display=False) as counter:
        norm_sq = low_rank_frobenius_sq(U, V)
    assert norm_sq == pytest.approx(float((U.double() @ V.double()).square().sum()), rel=1e-12)
    assert counter.get_total_flops() <= 2 * min(rank * rank * (64 + 48), 64 * 48 * rank)
