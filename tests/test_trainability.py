"""Which factors get gradients where (AFLoRA's DLF), and why B and Λ cannot both start at zero."""

from __future__ import annotations

import pytest
import torch

from aflora.data import topic_classification_task
from aflora.encoding import PromptEncoder, collate, training_batches
from aflora.lora.factors import ModuleFactors
from aflora.methods.aflora import AFLoRA, AFLoRAOptions
from aflora.methods.base import ClientSpec, TrainSpec, tensor_key
from aflora.training import OptimConfig, batch_loss, train_adapter

RECORDS = [{"text": f"story number {i} about {w}", "label": i % 4} for i, w in enumerate(["votes", "goals", "stocks", "chips"] * 4)]


def encoded(tokenizer):
    encoder = PromptEncoder(tokenizer, topic_classification_task(), max_length=64)
    return encoder, [encoder.encode_classification(r) for r in RECORDS]


def aflora_for(host, ranks=(6, 3), options: AFLoRAOptions | None = None) -> AFLoRA:
    method = AFLoRA(options or AFLoRAOptions(), module_shapes=host.module_shapes(),
                    clients=[ClientSpec(i, r, 10) for i, r in enumerate(ranks)], seed=0)
    method.init_server_state()
    return method


def test_client_trains_only_B_and_lambda_against_frozen_A(tiny_llama, tiny_host):
    _, tokenizer = tiny_llama
    encoder, examples = encoded(tokenizer)
    method = aflora_for(tiny_host)
    instruction = method.instruct(1, round_=1)
    spec = method.local_job(instruction)
    assert spec.trainable == frozenset({"B", "lam"})

    tiny_host.install(spec.adapter, trainable=spec.trainable)
    grads_on = {n.split(".lora_")[1].split(".")[0] for n, p in tiny_host.model.named_parameters() if p.requires_grad}
    assert grads_on == {"B", "lambda"}
    tiny_host.clear()

    result = train_adapter(tiny_host, spec, training_batches(examples, 4, tokenizer.pad_token_id, seed=0), steps=3,
                           optim=OptimConfig(lr=0.05), objective="class_ce", label_token_ids=encoder.label_token_ids)
    for name, before in spec.adapter.items():
        after = result.adapter[name]
        assert torch.equal(after.A, instruction.tensors[tensor_key("A", name)]), "A must stay frozen on the client"
        assert not torch.equal(after.B, before.B) and not torch.equal(after.lam, before.lam)
    upload = method.upload(instruction, result.adapter, num_examples=len(examples))
    for name, (m, _) in tiny_host.module_shapes().items():
        assert upload.tensors[tensor_key("B", name)].shape == (m, 3)  # exactly r_k kept columns
    assert spec.trained_params() == sum((m + 1) * 3 for m, _ in tiny_host.module_shapes().values())


def test_server_step_trains_only_A(tiny_llama, tiny_host):
    _, tokenizer = tiny_llama
    encoder, examples = encoded(tokenizer)
    g = torch.Generator().manual_seed(0)
    adapter = {n: ModuleFactors(A=torch.randn(4, k, generator=g), B=torch.randn(m, 4, generator=g) * 0.1)
               for n, (m, k) in tiny_host.module_shapes().items()}
    spec = TrainSpec(adapter=adapter, trainable=frozenset({"A"}))
    tiny_host.install(spec.adapter, trainable=spec.trainable)
    grads_on = {n.split(".lora_")[1].split(".")[0] for n, p in tiny_host.model.named_parameters() if p.requires_grad}
    assert grads_on == {"A"}
    tiny_host.clear()
    result = train_adapter(tiny_host, spec, training_batches(examples, 4, tokenizer.pad_token_id, seed=0), steps=2,
                           optim=OptimConfig(lr=0.05), objective="class_ce", label_token_ids=encoder.label_token_ids)
    for name in adapter:
        assert torch.equal(result.adapter[name].B, adapter[name].B), "B_global must stay frozen on the server"
        assert not torch.equal(result.adapter[name].A, adapter[name].A)


def gradients_at_init(host, tokenizer, adapter):
    encoder, examples = encoded(tokenizer)
    host.install(adapter, trainable={"B", "lam"})
    host.model.zero_grad(set_to_none=True)
    batch_loss(host.model, collate(examples[:4], tokenizer.pad_token_id), "class_ce", encoder.label_token_ids).backward()
    params = host.factor_parameters()
    grads = {k: sum(float(p[k].grad.abs().sum()) for p in params.values()) for k in ("B", "lam")}
    host.clear()
    return grads


def test_our_initialization_starts_at_zero_update_with_a_gradient_on_lambda(tiny_llama, tiny_host, token_batch):
    model, tokenizer = tiny_llama
    base = model(token_batch).logits
    method = aflora_for(tiny_host)
    spec = method.local_job(method.instruct(0, round_=1))
    tiny_host.install(spec.adapter)
    torch.testing.assert_close(model(token_batch).logits, base)  # Λ = 0: ΔW = 0, the merged model is unchanged
    tiny_host.clear()
    grads = gradients_at_init(tiny_host, tokenizer, spec.adapter)
    assert grads["lam"] > 0, "Λ must receive a gradient at the start of every round"
    assert grads["B"] == 0  # ∂L/∂B ∝ Λ = 0 at the first step; B follows once Λ moved


def test_zero_B_and_zero_lambda_would_never_learn(tiny_llama, tiny_host):
    """The paper's literal 'initialize B and Λ with zeros' is a saddle: every gradient is zero."""
    _, tokenizer = tiny_llama
    method = aflora_for(tiny_host)
    spec = method.local_job(method.instruct(0, round_=1))
    zeroed = {n: ModuleFactors(A=f.A, B=torch.zeros_like(f.B), lam=torch.zeros_like(f.lam)) for n, f in spec.adapter.items()}
    assert gradients_at_init(tiny_host, tokenizer, zeroed) == {"B": 0.0, "lam": 0.0}


def test_B_columns_start_at_unit_norm_and_the_penalty_matches_eq10(tiny_host):
    method = aflora_for(tiny_host)
    spec = method.local_job(method.instruct(0, round_=1))
    for factors in spec.adapter.values():
        torch.testing.assert_close(factors.B.norm(dim=0), torch.ones(factors.rank))
    params = {n: {"B": torch.nn.Parameter(f.B * 2.0)} for n, f in spec.adapter.items()}  # every ‖b_j‖² = 4
    expected = method.options.gamma * sum(f.rank * (4.0 - 1.0) ** 2 for f in spec.adapter.values())
    assert spec.penalty(params).item() == pytest.approx(expected, rel=1e-5)


ZERO_B = AFLoRAOptions(client_init="zero_b", ddr=False)


def test_zero_b_starts_at_zero_update_with_a_gradient_on_B(tiny_llama, tiny_host, token_batch):
    model, tokenizer = tiny_llama
    base = model(token_batch).logits
    method = aflora_for(tiny_host, options=ZERO_B)
    spec = method.local_job(method.instruct(0, round_=1))
    for name, factors in spec.adapter.items():
        assert torch.equal(factors.B, torch.zeros_like(factors.B))
        torch.testing.assert_close(factors.lam, torch.full((factors.rank,), 1.0 / method.row_norm(name)))
        torch.testing.assert_close((factors.lam[:, None] * factors.A).norm(dim=1), torch.ones(factors.rank))  # Λ·A: unit rows
    tiny_host.install(spec.adapter)
    torch.testing.assert_close(model(token_batch).logits, base)  # B = 0: ΔW = 0
    tiny_host.clear()
    grads = gradients_at_init(tiny_host, tokenizer, spec.adapter)
    assert grads["B"] > 0, "B must receive a gradient at the start of every round"
    assert grads["lam"] == 0  # ∂L/∂Λ ∝ B = 0 at the first step


def test_zero_b_refuses_ddr_which_could_not_prune():
    with pytest.raises(ValueError, match="ddr = false"):
        AFLoRAOptions(client_init="zero_b")
    with pytest.raises(ValueError, match="client_init"):
        AFLoRAOptions(client_init="zeros", ddr=False)


def train_one_client(host, tokenizer, spec: TrainSpec, steps: int) -> dict[str, ModuleFactors]:
    """The trained adapter of one client, on the same batches for every client."""
    encoder, examples = encoded(tokenizer)
    return train_adapter(host, spec, training_batches(examples, 4, tokenizer.pad_token_id, seed=0), steps=steps,
                         optim=OptimConfig(lr=0.01), objective="class_ce", label_token_ids=encoder.label_token_ids).adapter


def aggregate_over_copies(host, tokenizer, options: AFLoRAOptions, clients: int = 4) -> float:
    """‖B_global·A‖ / mean_k ‖B'_k·A_k‖ (summed over modules) after identical clients train on identical batches."""
    method = aflora_for(host, ranks=(3,) * clients, options=options)
    uploads, each = [], 0.0
    for cid in range(clients):
        instruction = method.instruct(cid, round_=1)
        trained = train_one_client(host, tokenizer, method.local_job(instruction), steps=2)
        uploads.append(method.upload(instruction, trained, num_examples=10))
        each += sum(float((f.scaled_B() @ f.A).norm()) for f in trained.values()) / clients
    method.aggregate(uploads, round_=1)
    return sum(float((method.B_global[n] @ method.A_global[n]).norm()) for n in method.A_global) / each


def test_unit_b_clients_cancel_where_zero_b_clients_agree(tiny_llama, tiny_host):
    """Why the init matters under IID: identical clients want the same ΔW. With 'unit_b' each one's early
    steps move ΔW only within its own random columns' span, so their average cancels; with 'zero_b' their
    updates coincide and the average keeps its full size."""
    _, tokenizer = tiny_llama
    assert aggregate_over_copies(tiny_host, tokenizer, ZERO_B) == pytest.approx(1.0, abs=1e-4)
    assert aggregate_over_copies(tiny_host, tokenizer, AFLoRAOptions(ddr=False)) < 0.8


def first_step_size_ratio(host, tokenizer, options: AFLoRAOptions) -> float:
    """‖ΔW‖ after one step of the rank-6 client ÷ the rank-3 client's, on the same batch."""
    method = aflora_for(host, ranks=(6, 3), options=options)
    sizes = []
    for cid in (0, 1):
        trained = train_one_client(host, tokenizer, method.local_job(method.instruct(cid, round_=1)), steps=1)
        sizes.append(sum(float((f.scaled_B() @ f.A).pow(2).sum()) for f in trained.values()) ** 0.5)
    return sizes[0] / sizes[1]


def test_zero_b_rs_steps_alike_at_every_rank(tiny_llama, tiny_host):
    """An Adam step moves each of B's m·r entries by ≈ lr, so with Λ·A's rows at unit norm ('zero_b') ΔW's step
    grows as √r (√2 from rank 3 to 6); Λ = 1/(C·√r) ('zero_b_rs') makes it the same at every rank."""
    _, tokenizer = tiny_llama
    assert first_step_size_ratio(tiny_host, tokenizer, ZERO_B) == pytest.approx(2**0.5, rel=0.1)
    assert first_step_size_ratio(tiny_host, tokenizer, AFLoRAOptions(client_init="zero_b_rs", ddr=False)) == pytest.approx(1.0, rel=0.1)


FIXED_LAMBDA = AFLoRAOptions(client_init="zero_b_rs", ddr=False, train_lambda=False, gamma=0.0)


def test_fixed_lambda_trains_B_alone_as_ffa_lora_does_against_lambda_A(tiny_llama, tiny_host):
    """train_lambda = false: Λ keeps its start, and B's steps are those of LoRA with B alone trained against the
    fixed product Λ·A (FFA-LoRA's client step, scaling 1), so both give the same ΔW; training Λ as well does not."""
    _, tokenizer = tiny_llama
    method = aflora_for(tiny_host, ranks=(3,), options=FIXED_LAMBDA)
    spec = method.local_job(method.instruct(0, round_=1))
    assert spec.trainable == frozenset({"B"}) and spec.tensorwise == frozenset()
    assert spec.trained_params() == sum(m * 3 for m, _ in tiny_host.module_shapes().values())
    trained = train_one_client(tiny_host, tokenizer, spec, steps=3)

    plain = TrainSpec(adapter={n: ModuleFactors(A=f.lam[:, None] * f.A, B=f.B) for n, f in spec.adapter.items()},
                      trainable=frozenset({"B"}))
    reference = train_one_client(tiny_host, tokenizer, plain, steps=3)
    trained_lambda = train_one_client(tiny_host, tokenizer, aflora_for(tiny_host, ranks=(3,), options=AFLoRAOptions(
        client_init="zero_b_rs", ddr=False, gamma=0.0)).local_job(method.instruct(0, round_=1)), steps=3)
    for name, start in spec.adapter.items():
        assert torch.equal(trained[name].lam, start.lam), "Λ must keep its start"
        delta = trained[name].scaled_B() @ trained[name].A
        assert delta.norm() > 0
        torch.testing.assert_close(delta, reference[name].B @ reference[name].A, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(trained_lambda[name].scaled_B() @ trained_lambda[name].A, delta, rtol=1e-3, atol=1e-6)


def test_fixed_lambda_refuses_the_random_start_where_nothing_would_train():
    with pytest.raises(ValueError, match="train_lambda = false"):
        AFLoRAOptions(ddr=False, train_lambda=False)
