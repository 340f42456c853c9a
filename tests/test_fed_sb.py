"""Fed-SB on tiny tensors and the tiny models: exact averaging of R, only R trains, r² uplink, the B·R·A PEFT
variant against a hand computation, checkpoint state, export as plain LoRA, and R's quadratic budget cost."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from test_baselines_math import SHAPES, fedavg_weights, make
from test_new_methods_math import resumed
from transformers.pytorch_utils import Conv1D

from aflora.budgets import DeviceBudget, ModelFootprint, max_rank_within
from aflora.costs import payload_params
from aflora.lora.export import save_peft_adapter
from aflora.lora.factors import ModuleFactors, stack_adapters
from aflora.lora.host import ADAPTER_NAME, AdapterHost
from aflora.methods.base import ClientSpec, tensor_key
from aflora.methods.fed_sb import FedSB
from aflora.models import build_tiny_model


def trained_R(method, client_id, round_, generator):
    """A client's round with training replaced by a random R (B and A as the method built them)."""
    instruction = method.instruct(client_id, round_)
    spec = method.local_job(instruction)
    trained = {name: ModuleFactors(A=f.A, B=f.B, R=torch.randn(f.R.shape, generator=generator)) for name, f in spec.adapter.items()}
    return trained, method.upload(instruction, trained, method.clients[client_id].num_examples)


def fed_sb_for(host: AdapterHost, ranks: list[int]) -> FedSB:
    method = FedSB(FedSB.options_class(), module_shapes=host.module_shapes(),
                   clients=[ClientSpec(i, r, 10) for i, r in enumerate(ranks)], seed=0)
    method.init_server_state()
    return method


def random_core_adapter(host: AdapterHost, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {name: ModuleFactors(A=torch.randn(rank, n, generator=g) * 0.1, B=torch.randn(m, rank, generator=g) * 0.1,
                                R=torch.randn(rank, rank, generator=g))  # not symmetric: R and Rᵀ differ
            for name, (m, n) in host.module_shapes().items()}


# ---------------------------------------------------------------------------- aggregation
def test_averaged_R_reproduces_the_weighted_sum_of_client_products_over_two_rounds():
    g = torch.Generator().manual_seed(0)
    sizes = [10, 30, 60]  # unequal: a uniform mean (the reference's .mean(0)) would fail here
    method = make("fed_sb", [8, 4, 6], sizes)
    assert method.rank == 4
    p = fedavg_weights(sizes)
    for round_ in (1, 2):
        runs = [trained_R(method, cid, round_, g) for cid in range(3)]
        method.aggregate([upload for _, upload in runs], round_=round_)
        for name in SHAPES:
            dense = sum(w * (t[name].B.double() @ t[name].R.double() @ t[name].A.double()) for w, (t, _) in zip(p, runs))
            torch.testing.assert_close(method.global_adapter()[name].delta().double(), dense, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(method.global_adapter()[name].R, sum(w * t[name].R for w, (t, _) in zip(p, runs)))
        assert method.aggregation_error() < 1e-6
    # round 2's clients started from round 1's R̄, not from zero
    assert all(float(f.R.abs().sum()) > 0 for f in method.local_job(method.instruct(0, 3)).adapter.values())


def test_B_and_A_are_shared_orthonormal_frozen_and_rebuilt_from_the_seed_alone():
    server = make("fed_sb", [4, 4], [1, 1])
    client_side = FedSB(server.options, module_shapes=SHAPES, clients=list(server.clients.values()), seed=server.seed)
    other_seed = FedSB(server.options, module_shapes=SHAPES, clients=list(server.clients.values()), seed=server.seed + 1)
    spec = client_side.local_job(server.instruct(1, 1))
    for name, factors in spec.adapter.items():
        torch.testing.assert_close(factors.B, server.global_adapter()[name].B, rtol=0, atol=0)  # bit for bit
        torch.testing.assert_close(factors.A, server.global_adapter()[name].A, rtol=0, atol=0)
        torch.testing.assert_close(factors.B.T @ factors.B, torch.eye(4), atol=1e-6, rtol=0)
        torch.testing.assert_close(factors.A @ factors.A.T, torch.eye(4), atol=1e-6, rtol=0)
        assert torch.count_nonzero(factors.R) == 0  # ΔW = 0 at the start
        assert not torch.allclose(factors.B, other_seed.local_job(server.instruct(1, 1)).adapter[name].B)
    with pytest.raises(ValueError, match="exceeds module .* set fed_sb.rank to at most 6"):
        make("fed_sb", [8], [1], rank=8)  # blk.0.v is 6 × 10


# ---------------------------------------------------------------------------- what travels
@pytest.mark.parametrize("num_clients", [2, 5])
def test_uplink_and_downlink_are_exactly_R_per_module_whatever_the_number_of_clients(num_clients):
    g = torch.Generator().manual_seed(1)
    method = make("fed_sb", [4] * num_clients, [1] * num_clients)
    instruction = method.instruct(0, 1)
    assert set(instruction.tensors) == {tensor_key("R", name) for name in SHAPES}
    _, upload = trained_R(method, 0, 1, g)
    assert {k: tuple(t.shape) for k, t in upload.tensors.items()} == {tensor_key("R", name): (4, 4) for name in SHAPES}
    assert payload_params(upload.tensors) == len(SHAPES) * 4**2
    assert method.expected_upload(instruction) == dict.fromkeys(upload.tensors, ((4, 4), torch.float32))


# ---------------------------------------------------------------------------- on the tiny host
def test_only_R_trains_on_the_tiny_host(tiny_host, token_batch):
    method = fed_sb_for(tiny_host, [4, 2])
    spec = method.local_job(method.instruct(0, 1))
    assert spec.trainable == {"R"} and spec.scaling == 1.0
    tiny_host.install(spec.adapter, trainable=spec.trainable, scaling=spec.scaling)
    tiny_host.model(token_batch).logits.float().pow(2).mean().backward()
    with_grad = {n for n, p in tiny_host.model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n in dict(tiny_host.model.named_parameters()) if ".lora_core." in n}
    assert len(with_grad) == len(tiny_host.module_names)
    assert all(float(p.grad.abs().sum()) > 0 for n, p in tiny_host.model.named_parameters() if n in with_grad)  # R = 0 still learns
    assert spec.trained_params() == len(tiny_host.module_names) * 2**2
    tiny_host.clear()


@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_core_variant_layer_computes_x_times_W_plus_scaling_BRA_transposed(tiny_host, scaling):
    tiny_host.install(random_core_adapter(tiny_host, rank=3), scaling=scaling)
    layer = tiny_host.layers[tiny_host.module_names[0]]
    A, B = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight  # as stored: B divided by the scaling
    R = layer.lora_core[ADAPTER_NAME]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    by_hand = x @ (layer.get_base_layer().weight + scaling * B @ R @ A).T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)
        layer.merge()  # PEFT's merge path (delta_weight) agrees with the forward
        torch.testing.assert_close(layer(x), by_hand, rtol=1e-5, atol=1e-6)
        layer.unmerge()
    tiny_host.clear()


@pytest.mark.parametrize("kind,targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn", "c_fc"])])
def test_installed_core_adapter_equals_W_plus_BRA_merged_by_hand_and_reads_back(kind, targets, token_batch):
    model, _ = build_tiny_model(kind)
    host = AdapterHost(model, targets)
    adapter = random_core_adapter(host, rank=3)
    clone = copy.deepcopy(model)  # the host holds no adapter yet: the clone computes its base weights
    for name, factors in adapter.items():
        base = clone.get_submodule(name).get_base_layer()
        delta = factors.B @ factors.R @ factors.A
        with torch.no_grad():
            base.weight += delta.T if isinstance(base, Conv1D) else delta  # GPT-2 stores (in, out)
    host.install(adapter, scaling=2.5)
    host_logits = model(token_batch).logits
    torch.testing.assert_close(host_logits, clone(token_batch).logits, rtol=1e-4, atol=1e-5)
    for name, factors in host.read().items():
        for key in ("A", "B", "R"):
            torch.testing.assert_close(getattr(factors, key), getattr(adapter[name], key))


def test_global_BRA_exports_as_plain_lora_that_stock_peft_loads(tmp_path, token_batch):
    """R folded into B (B' = B·R): the saved adapter is plain LoRA and reproduces the installed B·R·A."""
    model, _ = build_tiny_model("tiny-llama")
    host = AdapterHost(model, ["q_proj", "v_proj"])
    method = fed_sb_for(host, [3])
    g = torch.Generator().manual_seed(3)
    method.aggregate([trained_R(method, 0, 1, g)[1]], round_=1)
    global_adapter = method.global_adapter()
    host.install(global_adapter)
    expected = model(token_batch).logits
    exported = stack_adapters([global_adapter])
    assert all(f.R is None and f.lam is None for f in exported.values())
    save_peft_adapter(exported, tmp_path, base_model="tiny-llama")
    fresh, _ = build_tiny_model("tiny-llama")
    torch.testing.assert_close(PeftModel.from_pretrained(fresh, tmp_path)(token_batch).logits, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- state and budgets
def test_checkpoint_state_round_trips_through_torch_save():
    g = torch.Generator().manual_seed(4)
    method = make("fed_sb", [4, 4], [3, 5])
    method.aggregate([trained_R(method, cid, 1, g)[1] for cid in (0, 1)], round_=1)
    restored = resumed(method)
    uploads = [trained_R(method, cid, 2, g)[1] for cid in (0, 1)]
    for m in (method, restored):
        m.aggregate(uploads, round_=2)
    for name in SHAPES:
        for key in ("A", "B", "R"):
            assert torch.equal(getattr(restored.global_adapter()[name], key), getattr(method.global_adapter()[name], key))


def test_R_costs_r_squared_in_the_budget_model():
    footprint = ModelFootprint(base_params=0, module_shapes=SHAPES, num_blocks=1, hidden_size=1, num_heads=1)
    assert footprint.factor_params(FedSB.uploaded_factors, 5) == len(SHAPES) * 25
    with pytest.raises(ValueError, match="do not cost the same per unit of rank"):
        footprint.params_per_rank(FedSB.uploaded_factors)
    budget = DeviceBudget(memory_mb=1e9, uplink_mb=4 * len(SHAPES) * 7**2 / 2**20)
    assert max_rank_within(budget, footprint, trained=FedSB.trained_factors, uploaded=FedSB.uploaded_factors,
                           batch_size=1, seq_len=1) == 7  # 2·7² fits the uplink, 2·8² does not


def test_a_module_holds_one_core_of_the_right_shape():
    A, B = torch.zeros(2, 5), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="at most one core"):
        ModuleFactors(A=A, B=B, lam=torch.zeros(2), R=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"R has shape \(2, 3\), expected \(2, 2\)"):
        ModuleFactors(A=A, B=B, R=torch.zeros(2, 3))
    R = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    factors = ModuleFactors(A=torch.randn(2, 5), B=torch.randn(3, 2), R=R)
    torch.testing.assert_close(factors.delta(), factors.B @ R @ factors.A)
