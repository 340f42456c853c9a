"""The shared-model adapter host and the Λ-LoRA PEFT variant, on tiny Llama (Linear) and GPT-2 (Conv1D) models."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

from aflora.lora.export import save_peft_adapter
from aflora.lora.factors import ModuleFactors, stack_adapters
from aflora.lora.host import AdapterHost, block_index
from aflora.models import build_tiny_model


def random_adapter(host: AdapterHost, rank: int, *, diagonal: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: ModuleFactors(
            A=torch.randn(rank, n, generator=g) * 0.1,
            B=torch.randn(m, rank, generator=g) * 0.1,
            lam=torch.randn(rank, generator=g) if diagonal else None,
        )
        for name, (m, n) in host.module_shapes().items()
    }


def reference_forward(model, adapter, token_batch):
    """Forward of a deep copy whose weights got W + B·diag(λ)·A added by hand (no PEFT involved)."""
    clone = copy.deepcopy(model)
    for name, factors in adapter.items():
        layer = clone.get_submodule(name).get_base_layer()
        delta = factors.B @ torch.diag(factors.lam if factors.lam is not None else torch.ones(factors.rank)) @ factors.A
        with torch.no_grad():
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta  # GPT-2 stores (in, out)
    for name in adapter:
        layer = clone.get_submodule(name)
        if "aflora" in layer.lora_A:
            layer.delete_adapter("aflora")
    return clone(token_batch).logits


@pytest.mark.parametrize("kind,targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn", "c_proj", "c_fc"])])
@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_installed_adapter_computes_W_plus_B_lambda_A(kind, targets, diagonal, scaling, token_batch):
    model, _ = build_tiny_model(kind)
    base = model(token_batch).logits
    host = AdapterHost(model, targets)
    torch.testing.assert_close(model(token_batch).logits, base)  # injection alone changes nothing
    adapter = random_adapter(host, rank=3, diagonal=diagonal)
    host.install(adapter, scaling=scaling)
    torch.testing.assert_close(model(token_batch).logits, reference_forward(host.model, adapter, token_batch), rtol=1e-4, atol=1e-5)
    read = host.read()
    for name, factors in adapter.items():  # read() hands back the scale-free factors it was given
        torch.testing.assert_close(read[name].B, factors.B)
        torch.testing.assert_close(read[name].A, factors.A)
    host.clear()
    torch.testing.assert_close(model(token_batch).logits, base)


def test_merge_into_base_equals_installed_adapter(tiny_host, token_batch):
    adapter = random_adapter(tiny_host, rank=4, diagonal=True)
    tiny_host.install(adapter)
    with_adapter = tiny_host.model(token_batch).logits
    tiny_host.clear()
    tiny_host.merge_into_base(adapter)
    torch.testing.assert_close(tiny_host.model(token_batch).logits, with_adapter, rtol=1e-4, atol=1e-5)


def test_trainable_flags_select_factors(tiny_host):
    tiny_host.install(random_adapter(tiny_host, rank=2, diagonal=True), trainable={"B", "lam"})
    trainable = {n for n, p in tiny_host.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_B." in n or ".lora_lambda." in n for n in trainable)
    assert len(trainable) == 2 * len(tiny_host.module_names)
    tiny_host.install(random_adapter(tiny_host, rank=2, diagonal=False), trainable={"A"})
    trainable = {n for n, p in tiny_host.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n for n in trainable)


def test_ranks_can_change_between_installs_and_base_parameters_stay_frozen(tiny_host):
    for rank in (8, 1, 5):
        tiny_host.install(random_adapter(tiny_host, rank=rank, diagonal=True), trainable={"B"})
        assert {f.rank for f in tiny_host.read().values()} == {rank}
    base_trainable = [n for n, p in tiny_host.model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert base_trainable == []


def test_unknown_target_modules_are_explained(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="c_attn.*its Linear layers are named.*q_proj"):
        AdapterHost(model, ["c_attn"])


def test_block_index():
    assert block_index("model.layers.17.self_attn.q_proj") == 17
    assert block_index("transformer.h.3.attn.c_attn") == 3
    assert block_index("lm_head") is None


@pytest.mark.parametrize("kind,targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn", "c_fc"])])
def test_saved_adapter_loads_with_stock_peft_and_matches(kind, targets, tmp_path, token_batch):
    """Two rounds of merges + a live adapter, stacked and saved, reproduce the merged model under stock PEFT."""
    model, _ = build_tiny_model(kind)
    host = AdapterHost(model, targets)
    rounds = [random_adapter(host, rank=r, diagonal=True, seed=s) for r, s in ((3, 1), (2, 2))]
    for update in rounds:
        host.merge_into_base(update)
    live = random_adapter(host, rank=4, diagonal=False, seed=3)
    host.install(live)
    expected = host.model(token_batch).logits
    conv1d = {n for n in host.module_names if host.is_conv1d(n)}
    save_peft_adapter(stack_adapters(rounds + [live]), tmp_path, base_model=kind, conv1d_modules=conv1d)

    fresh, _ = build_tiny_model(kind)  # the original pretrained weights, no aflora code involved
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(token_batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_stack_adapters_sums_products():
    g = torch.Generator().manual_seed(0)
    a = {"m": ModuleFactors(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), torch.randn(2, generator=g))}
    b = {"m": ModuleFactors(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g))}
    stacked = stack_adapters([a, b])
    assert stacked["m"].rank == 5
    torch.testing.assert_close(stacked["m"].delta(), a["m"].delta() + b["m"].delta())
