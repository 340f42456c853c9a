"""Each baseline's aggregation on tiny random tensors, against reference computations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aflora.costs import payload_bytes, payload_params
from aflora.lora.factors import FACTORS, ModuleFactors
from aflora.methods import METHODS, method_options
from aflora.methods.aggregation import LoRAScaling
from aflora.methods.base import ClientSpec, FederatedMethod, tensor_key
from aflora.methods.flexlora import FlexLoRA
from aflora.methods.hetlora import HetLoRA, tail_penalty, tail_start

SHAPES = {"blk.0.q": (12, 10), "blk.0.v": (6, 10)}


def make(name, ranks, sizes, **options):
    method = METHODS[name](method_options(name, options), module_shapes=SHAPES,
                           clients=[ClientSpec(i, r, n) for i, (r, n) in enumerate(zip(ranks, sizes))], seed=0)
    method.init_server_state()
    return method


def trained_randomly(method, client_id, round_, generator, kept=None):
    """A client's round with training replaced by random values for every trainable factor."""
    instruction = method.instruct(client_id, round_)
    spec = method.local_job(instruction, kept)
    trained = {}
    for name, f in spec.adapter.items():
        A = torch.randn(f.A.shape, generator=generator) if "A" in spec.trainable else f.A
        B = torch.randn(f.B.shape, generator=generator) if "B" in spec.trainable else f.B
        trained[name] = ModuleFactors(A=A, B=B)
    return instruction, spec, trained, method.upload(instruction, trained, method.clients[client_id].num_examples)


def fedavg_weights(sizes):
    return [n / sum(sizes) for n in sizes]


def ideal(weights, trained, name):
    return sum(p * (t[name].B.double() @ t[name].A.double()) for p, t in zip(weights, trained))


def relative(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ---------------------------------------------------------------------------- FedIT / FFA-LoRA / FedSA-LoRA
def test_fedit_averages_A_and_B_separately_and_is_inexact():
    g = torch.Generator().manual_seed(0)
    sizes = [10, 30, 60]
    method = make("fedit", [8, 4, 4], sizes)
    assert method.rank == 4  # the smallest budget, so every client can run it
    runs = [trained_randomly(method, cid, 1, g) for cid in range(3)]
    method.aggregate([r[3] for r in runs], round_=1)
    p = fedavg_weights(sizes)
    for name in SHAPES:
        mean_A = sum(w * r[2][name].A for w, r in zip(p, runs))
        mean_B = sum(w * r[2][name].B for w, r in zip(p, runs))
        torch.testing.assert_close(method.global_adapter()[name].A, mean_A)
        torch.testing.assert_close(method.global_adapter()[name].B, mean_B)
    # Eq. 5: the product of averages differs from the average of products
    targets = {n: ideal(p, [r[2] for r in runs], n) for n in SHAPES}
    errors = [relative((method.global_adapter()[n].B @ method.global_adapter()[n].A).double(), targets[n]) for n in SHAPES]
    assert method.aggregation_error() > 0.1
    combined = np.sqrt(sum(float(torch.linalg.norm(method.global_adapter()[n].delta().double() - targets[n]) ** 2) for n in SHAPES)
                       / sum(float(torch.linalg.norm(targets[n]) ** 2) for n in SHAPES))
    assert method.aggregation_error() == pytest.approx(combined, rel=1e-6)
    assert min(errors) > 0


def test_ffa_lora_keeps_A_frozen_and_is_exact():
    g = torch.Generator().manual_seed(1)
    sizes = [5, 15]
    method = make("ffa_lora", [4, 4], sizes)
    A0 = {n: f.A.clone() for n, f in method.global_adapter().items()}
    for round_ in (1, 2):
        runs = [trained_randomly(method, cid, round_, g) for cid in range(2)]
        assert all(set(r[3].tensors) == {tensor_key("B", n) for n in SHAPES} for r in runs)  # only B travels up
        method.aggregate([r[3] for r in runs], round_=round_)
    p = fedavg_weights(sizes)
    for name in SHAPES:
        assert torch.equal(method.global_adapter()[name].A, A0[name])
        torch.testing.assert_close(method.global_adapter()[name].delta().double(), ideal(p, [r[2] for r in runs], name))
    assert method.aggregation_error() == 0.0


def test_fedsa_lora_shares_A_and_keeps_B_personal():
    g = torch.Generator().manual_seed(2)
    sizes = [20, 20, 60]
    method = make("fedsa_lora", [4, 4, 4], sizes)
    instruction, spec, trained, upload = trained_randomly(method, 0, 1, g)
    assert not any(k.startswith("B/") for k in instruction.tensors)  # the server never sends B
    assert all(torch.count_nonzero(f.B) == 0 for f in spec.adapter.values())  # a first-time client starts at B = 0
    assert set(upload.local_state) == {tensor_key("B", n) for n in SHAPES}
    # The protocol's uplink is A only; the personal B reported for global evaluation is costed apart.
    assert payload_params(upload.tensors) == sum(4 * n for _, n in SHAPES.values())
    assert payload_bytes(upload.tensors, evaluation_only=True) == 4 * sum(4 * m for m, _ in SHAPES.values())
    # Next round, the client's job starts from the B it kept.
    again = method.local_job(method.instruct(0, 2), upload.local_state)
    for name in SHAPES:
        assert torch.equal(again.adapter[name].B, trained[name].B)

    runs = [(instruction, spec, trained, upload)] + [trained_randomly(method, cid, 1, g) for cid in (1, 2)]
    method.aggregate([r[3] for r in runs], round_=1)
    p = fedavg_weights(sizes)
    for name in SHAPES:
        torch.testing.assert_close(method.global_adapter()[name].A, sum(w * r[2][name].A for w, r in zip(p, runs)))
        torch.testing.assert_close(method.global_adapter()[name].B, sum(w * r[2][name].B for w, r in zip(p, runs)))
    assert method.aggregation_error() is None


def test_homogeneous_rank_option_overrides_the_smallest_budget():
    assert make("fedit", [8, 4], [1, 1], rank=2).rank == 2
    assert make("fedit", [8, 4], [1, 1], rank=2).instruct(0, 1).tensors[tensor_key("A", "blk.0.q")].shape == (2, 10)


# ---------------------------------------------------------------------------- FLoRA
def test_flora_stacking_is_exact_and_merged_each_round():
    g = torch.Generator().manual_seed(3)
    sizes, ranks = [10, 20, 30], [8, 4, 2]
    method = make("flora", ranks, sizes)
    runs = [trained_randomly(method, cid, 1, g) for cid in range(3)]
    for (_, spec, _, _), r in zip(runs, ranks):  # fresh LoRA of the client's own rank: B = 0
        assert all(f.rank == r and torch.count_nonzero(f.B) == 0 for f in spec.adapter.values())
    method.aggregate([r[3] for r in runs], round_=1)
    update = method.round_merge()
    p = fedavg_weights(sizes)
    for name in SHAPES:
        assert update[name].rank == sum(ranks)
        torch.testing.assert_close(update[name].delta().double(), ideal(p, [r[2] for r in runs], name), rtol=1e-6, atol=1e-6)
    assert method.aggregation_error() < 1e-6


def test_flora_homogeneous_ranks_keep_every_client():
    """The public FLoRA code's homogeneous branch kept only the first client; every client must count."""
    g = torch.Generator().manual_seed(4)
    method = make("flora", [4, 4, 4], [1, 1, 1])
    runs = [trained_randomly(method, cid, 1, g) for cid in range(3)]
    method.aggregate([r[3] for r in runs], round_=1)
    for name in SHAPES:
        torch.testing.assert_close(method.round_merge()[name].delta().double(), ideal([1 / 3] * 3, [r[2] for r in runs], name),
                                   rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- FlexLoRA
def test_flexlora_averages_products_exactly_and_truncation_loss_equals_discarded_singular_values():
    g = torch.Generator().manual_seed(5)
    sizes, ranks = [10, 30], [6, 2]
    method = make("flexlora", ranks, sizes)
    runs = [trained_randomly(method, cid, 1, g) for cid in range(2)]
    method.aggregate([r[3] for r in runs], round_=1)
    p = fedavg_weights(sizes)
    for name in SHAPES:
        delta = ideal(p, [r[2] for r in runs], name)
        torch.testing.assert_close(method.global_adapter()[name].delta().double(), delta, rtol=1e-6, atol=1e-6)
    # Next round each client starts from the best rank-r_k approximation; its error is the discarded σ's.
    squared_error, squared_total = {0: 0.0, 1: 0.0}, 0.0
    for name in SHAPES:
        delta = ideal(p, [r[2] for r in runs], name).numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)
        squared_total += float((sigma**2).sum())
        for cid, rank in enumerate(ranks):
            start = method.instruct(cid, 2)
            B, A = start.tensors[tensor_key("B", name)].double(), start.tensors[tensor_key("A", name)].double()
            residual = np.linalg.norm(delta - (B @ A).numpy()) ** 2
            assert residual == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-4, abs=1e-8)
            squared_error[cid] += float((sigma[rank:] ** 2).sum())
    expected = sum(w * (squared_error[c] / squared_total) ** 0.5 for c, w in enumerate(p))
    assert method.round_diagnostics()["truncation_loss"] == pytest.approx(expected, rel=1e-6)
    assert expected > 0.05
    assert method.aggregation_error() < 1e-6  # the aggregate is exact; the loss is in the redistribution


def test_flexlora_round_one_starts_from_fresh_lora():
    method = make("flexlora", [4, 2], [1, 1])
    spec = method.local_job(method.instruct(1, 1))
    assert all(f.rank == 2 and torch.count_nonzero(f.B) == 0 for f in spec.adapter.values())
    assert isinstance(method, FlexLoRA)


# ---------------------------------------------------------------------------- HETLoRA
def test_hetlora_zero_padded_sparsity_weighted_aggregation():
    g = torch.Generator().manual_seed(6)
    ranks = [8, 4, 2]
    method = make("hetlora", ranks, [1, 1, 1], self_pruning=False)
    runs = [trained_randomly(method, cid, 1, g) for cid in range(3)]
    for (instruction, _, _, _), r in zip(runs, ranks):
        assert instruction.tensors[tensor_key("A", "blk.0.q")].shape == (r, 10)  # truncation to the client's rank
    method.aggregate([r[3] for r in runs], round_=1)
    for name, (m, n) in SHAPES.items():
        norms = [float(torch.linalg.norm(r[2][name].B @ r[2][name].A)) for r in runs]
        weights = [x / sum(norms) for x in norms]
        padded_A = [torch.cat([r[2][name].A, torch.zeros(8 - r[2][name].rank, n)]) for r in runs]
        padded_B = [torch.cat([r[2][name].B, torch.zeros(m, 8 - r[2][name].rank)], dim=1) for r in runs]
        torch.testing.assert_close(method.global_adapter()[name].A, sum(w * a for w, a in zip(weights, padded_A)))
        torch.testing.assert_close(method.global_adapter()[name].B, sum(w * b for w, b in zip(weights, padded_B)))
    assert method.aggregation_error() > 0.05  # padding + averaging A and B separately is not exact


def test_hetlora_regularizer_has_gradients_on_the_tail_only():
    A = torch.nn.Parameter(torch.randn(8, 10))
    B = torch.nn.Parameter(torch.randn(12, 8))
    tail_penalty(0.5, start=6, scaling=1.0)({"m": {"A": A, "B": B}}).backward()
    assert A.grad[6:].abs().sum() > 0 and B.grad[:, 6:].abs().sum() > 0
    assert A.grad[:6].abs().sum() == 0 and B.grad[:, :6].abs().sum() == 0
    expected = 0.5 * (A[6:].norm() * B[:, 6:].norm()).item()
    assert tail_penalty(0.5, start=6, scaling=1.0)({"m": {"A": A, "B": B}}).item() == pytest.approx(expected)


@pytest.mark.parametrize("rank", [4, 64])
@pytest.mark.parametrize("scaling_options", [{}, {"alpha_rule": "fixed", "lora_alpha": 16.0}], ids=["default", "fixed16"])
def test_hetlora_regularizer_acts_on_the_factors_of_delta_w(rank, scaling_options):
    """λ means the same at every rank and alpha rule: the host stores B divided by the scaling, the penalty
    multiplies it back, so it equals λ·Σ‖A[t:]‖‖B[:, t:]‖ of the factors of ΔW = BA."""
    method = make("hetlora", [rank], [1], reg_weight=0.5, **scaling_options)
    spec = method.local_job(method.instruct(0, 1))
    g = torch.Generator().manual_seed(8)
    effective = {n: ModuleFactors(A=torch.randn(rank, k, generator=g), B=torch.randn(m, rank, generator=g)) for n, (m, k) in SHAPES.items()}
    as_stored = {n: {"A": f.A, "B": f.B / spec.scaling} for n, f in effective.items()}  # AdapterHost.install's convention
    start = tail_start(rank, method.options.keep_ratio, method.options.min_rank)
    expected = 0.5 * sum(float(f.A[start:].norm() * f.B[:, start:].norm()) for f in effective.values())
    assert float(spec.penalty(as_stored)) == pytest.approx(expected, rel=1e-5)


def test_hetlora_prunes_when_the_tail_shrank():
    method = make("hetlora", [10, 10], [1, 1], keep_ratio=0.6)
    g = torch.Generator().manual_seed(7)
    method.global_factors = {n: ModuleFactors(A=torch.randn(10, k, generator=g), B=torch.randn(m, 10, generator=g))
                             for n, (m, k) in SHAPES.items()}
    instruction = method.instruct(0, 2)
    shrunk = {n: ModuleFactors(A=instruction.tensors[tensor_key("A", n)] * torch.tensor([1.0] * 6 + [0.1] * 4)[:, None],
                               B=instruction.tensors[tensor_key("B", n)]) for n in SHAPES}
    grown = {n: ModuleFactors(A=instruction.tensors[tensor_key("A", n)] * 2.0, B=instruction.tensors[tensor_key("B", n)]) for n in SHAPES}
    assert int(method.upload(instruction, shrunk, 1).tensors["next_rank"]) == 6
    assert int(method.upload(instruction, grown, 1).tensors["next_rank"]) == 10
    method.aggregate([method.upload(instruction, shrunk, 1), method.upload(method.instruct(1, 2), grown, 1)], round_=2)
    assert method.ranks == {0: 6, 1: 10}
    assert isinstance(method, HetLoRA)


# ---------------------------------------------------------------------------- LoRA scaling per method
# The scaling alpha/r a client of rank r trains with, as each method's reference code sets it (docs/methods.md).
REFERENCE_SCALING = {
    "flora": lambda r: 2.0,  # ATP-1010/FederatedLLM main.py: lora_alpha = 2·r_k
    "hetlora": lambda r: 2.0,  # no public code; FLoRA's zero-padding (HETLoRA) baseline: lora_alpha = 2·r_k
    "flexlora": lambda r: 16 / r,  # FederatedScope FlexLoRA branch main.py: 'alpha': 16 for every client
    "fedit": lambda r: 16 / r,  # FederatedGPT-Shepherd main.py: lora_alpha 16
    "ffa_lora": lambda r: 16 / r,  # FedSA-LoRA's freeze_A reimplementation: r 8, lora_alpha 16
    "fedsa_lora": lambda r: 16 / r,  # FedSA-LoRA yamls/fedsa-lora.yaml: r 8, lora_alpha 16
    "florist": lambda r: 2.0,  # FLoRIST main.py (heter): lora_alpha = 2·local_ranks[client_id]
    "fedex_lora": lambda r: 8 / r,  # fedex-lora fed_train_glue.py: lora_r 4, lora_alpha 8
    "fed_sb": lambda r: 1.0,  # fed-sb fed/CR/train_cr_fed.py: lora_alpha = lora_r for agg_type fed-sb
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SCALING))
def test_each_client_rank_trains_with_its_reference_scaling(name):
    method = make(name, [4, 64], [1, 1])
    for client_id in (0, 1):
        spec = method.local_job(method.instruct(client_id, 1))
        rank = {f.rank for f in spec.adapter.values()}.pop()
        assert spec.scaling == pytest.approx(REFERENCE_SCALING[name](rank)), f"{name} at rank {rank}"


def test_alpha_rules_and_their_override():
    assert LoRAScaling(2.0, "times_rank").scaling(4) == LoRAScaling(2.0, "times_rank").scaling(64) == 2.0
    assert LoRAScaling(16.0, "fixed").scaling(64) == 0.25
    peft_style = make("flora", [64], [1], lora_alpha=16.0, alpha_rule="fixed")  # one config line away
    assert peft_style.local_job(peft_style.instruct(0, 1)).scaling == 0.25
    with pytest.raises(ValueError, match="alpha_rule must be one of"):
        make("hetlora", [4], [1], alpha_rule="per_rank")
    with pytest.raises(ValueError, match="lora_alpha must be > 0"):
        make("fedit", [4], [1], lora_alpha=0.0)


# ---------------------------------------------------------------------------- declared capabilities per method
SECURE_HOOKS = ("secure_weights", "secure_summands", "aggregate_secure")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declared_capabilities_match_what_the_class_implements(name):
    cls = METHODS[name]
    assert cls.exact_aggregation in (True, False, None), f"{name} must declare exact_aggregation (methods/base.py)"
    overridden = [getattr(cls, hook) is not getattr(FederatedMethod, hook) for hook in SECURE_HOOKS]
    assert cls.supports_secure_aggregation == all(overridden) == any(overridden), f"{name}: flag and SecAgg+ hooks disagree"
    assert cls.supports_dp == (cls.add_aggregate_noise is not FederatedMethod.add_aggregate_noise)
    assert cls.uploaded_factors <= cls.trained_factors <= set(FACTORS), f"{name} uploads or trains an unknown or untrained factor"


def test_capabilities_a_method_lacks_are_refused_by_name():
    method = make("fedit", [4], [1])
    with pytest.raises(NotImplementedError, match=r"FedIT.secure_weights is not implemented.*secagg.enabled = false"):
        method.secure_weights([0])
    with pytest.raises(NotImplementedError, match="fedit does not support client-level DP"):
        method.use_uniform_weights()
    aflora = make("aflora", [4], [1])
    assert not aflora.uniform_weights
    aflora.use_uniform_weights()
    assert aflora.uniform_weights


@pytest.mark.parametrize("name", sorted(METHODS))
def test_client_trainable_factors_per_method(name, tiny_host):
    # no cost model here: LEGEND trains A and B in either configuration, so its labelled 'capped' ablation stands in
    options = method_options(name, {"configuration": "capped"} if name == "legend" else {})
    method = METHODS[name](options, module_shapes=tiny_host.module_shapes(),
                           clients=[ClientSpec(0, 4, 10), ClientSpec(1, 2, 10)], seed=0)
    method.init_server_state()
    spec = method.local_job(method.instruct(0, 1))
    assert spec.trainable == method.trained_factors  # what the class declares (and budgets count) is what the job trains
    tiny_host.install(spec.adapter, trainable=spec.trainable, scaling=spec.scaling)
    suffix = {name: f".{factor.peft_attribute}." for name, factor in FACTORS.items()}  # where PEFT keeps each factor
    with_grad = {k for k, s in suffix.items() for n, p in tiny_host.model.named_parameters() if s in n and p.requires_grad}
    assert with_grad == method.trained_factors  # ... and what PEFT really trains
    tiny_host.clear()
