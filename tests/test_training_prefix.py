"""Training on a batch whose shared prompt start runs once equals training on its rows whole: same loss, same
gradients (into the adapter inside that start too), same trained adapter."""

from __future__ import annotations

import random

import pytest
import torch

from aflora.encoding import IGNORE_INDEX, MIN_SHARED_PREFIX, Encoded, collate, training_batches
from aflora.lora.factors import ModuleFactors
from aflora.lora.host import AdapterHost
from aflora.methods.base import TrainSpec
from aflora.models import build_tiny_model
from aflora.training import OptimConfig, PrefixCache, batch_loss, class_logits, is_deterministic_in_training, train_adapter

LABELS = [11, 12, 13]
CASES = [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn"])]


def rows_with_a_shared_start(prefix_length: int, count: int = 8, seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    start = [rng.randrange(3, 250) for _ in range(prefix_length)]
    return [Encoded(input_ids=start + [rng.randrange(3, 250) for _ in range(rng.randint(1, 20))], label=rng.randrange(3))
            for _ in range(count)]


def host_with_trainable_adapter(kind: str, targets: list[str]) -> tuple[AdapterHost, dict]:
    model, _ = build_tiny_model(kind)
    for module in model.modules():  # tiny GPT-2 has dropout, which a shared pass would share (see the last test)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    host = AdapterHost(model, targets)
    generator = torch.Generator().manual_seed(0)
    adapter = {name: ModuleFactors(A=torch.randn(4, n, generator=generator) * 0.3, B=torch.randn(m, 4, generator=generator) * 0.3)
               for name, (m, n) in host.module_shapes().items()}
    return host, adapter


def loss_and_gradients(host: AdapterHost, adapter: dict, batch, *, objective: str = "class_ce", detach_prefix: bool = False):
    host.install(adapter, trainable={"A", "B"}, scaling=2.0)
    host.model.train()
    if detach_prefix:  # a degenerate version: the prefix's keys and values as constants
        with torch.no_grad():
            prefix = PrefixCache.of(host.model, batch.prefix_ids)
        loss = torch.nn.functional.cross_entropy(class_logits(host.model, batch, LABELS, prefix=prefix), batch.labels)
    else:
        loss = batch_loss(host.model, batch, objective, LABELS)
    loss.backward()
    grads = {f"{module}.{factor}": p.grad.clone() for module, params in host.factor_parameters().items() for factor, p in params.items()}
    host.model.eval()
    host.clear()
    return loss.item(), grads


@pytest.mark.parametrize("kind,targets", CASES)
def test_a_batch_with_its_shared_start_run_once_has_the_whole_rows_loss_and_gradients(kind, targets):
    host, adapter = host_with_trainable_adapter(kind, targets)
    rows = rows_with_a_shared_start(16)
    whole_loss, whole = loss_and_gradients(host, adapter, collate(rows, 0))
    split = collate(rows, 0, split_prefix=True)
    assert len(split.prefix_ids) == 16
    split_loss, reused = loss_and_gradients(host, adapter, split)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for name, gradient in whole.items():
        torch.testing.assert_close(reused[name], gradient, rtol=1e-4, atol=1e-6)
    # The prefix's keys and values must carry gradient: as constants they give A and B other gradients.
    _, detached = loss_and_gradients(host, adapter, split, detach_prefix=True)
    assert max(float((detached[n] - g).abs().max() / g.abs().max()) for n, g in whole.items()) > 1e-2


@pytest.mark.parametrize("kind,targets", CASES)
def test_training_with_the_shared_start_run_once_trains_the_same_adapter(kind, targets):
    host, adapter = host_with_trainable_adapter(kind, targets)
    rows = rows_with_a_shared_start(12, count=24, seed=1)
    spec = TrainSpec(adapter=adapter, trainable=frozenset({"A", "B"}), scaling=2.0)
    results = [train_adapter(host, spec, training_batches(rows, 4, 0, seed=3, split_prefix=split), steps=4,
                             optim=OptimConfig(lr=0.01), objective="class_ce", label_token_ids=LABELS) for split in (False, True)]
    whole, reused = results
    assert reused.tokens == whole.tokens
    assert reused.mean_loss == pytest.approx(whole.mean_loss, rel=1e-5)
    for name, factors in whole.adapter.items():
        assert not torch.equal(factors.B, adapter[name].B)  # it trained
        torch.testing.assert_close(reused.adapter[name].A, factors.A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reused.adapter[name].B, factors.B, rtol=1e-4, atol=1e-5)


def test_collate_splits_off_the_rows_shared_start_and_keeps_every_token_counted():
    rows = rows_with_a_shared_start(10, count=5)
    whole, split = collate(rows, 0), collate(rows, 0, split_prefix=True)
    assert split.prefix_ids == rows[0].input_ids[:10]
    assert split.num_tokens == whole.num_tokens  # a client still trained on every token of its rows
    for row, example in enumerate(rows):
        n = len(example.input_ids) - 10
        assert split.input_ids[row, split.input_ids.shape[1] - n:].tolist() == example.input_ids[10:]
        assert split.position_ids[row, -1] == n - 1  # positions restart after the prefix (training.forward shifts them)
    torch.testing.assert_close(split.labels, whole.labels)

    short = rows_with_a_shared_start(MIN_SHARED_PREFIX - 1, count=5)
    assert collate(short, 0, split_prefix=True).prefix_ids == []  # too short to be worth a pass of its own


def lm_rows(prompt_start: int, targets_from: list[int], seed: int = 0) -> list[Encoded]:
    """LM rows sharing their first `prompt_start` tokens, row i's targets starting at position targets_from[i]."""
    rng = random.Random(seed)
    start = [rng.randrange(3, 250) for _ in range(prompt_start)]
    rows = []
    for first in targets_from:
        ids = start + [rng.randrange(3, 250) for _ in range(first + rng.randint(2, 9) - prompt_start)]
        rows.append(Encoded(input_ids=ids, lm_labels=[IGNORE_INDEX] * first + ids[first:]))
    return rows


def test_an_lm_batch_keeps_the_token_ahead_of_its_first_target_out_of_the_prefix():
    rows = lm_rows(16, [20, 18, 25])  # shared start 16 tokens, all of them prompt
    assert len(collate(rows, 0, split_prefix=True).prefix_ids) == 16
    early = lm_rows(16, [20, 12, 25])  # one row's targets begin at token 12, inside the shared start
    assert len(collate(early, 0, split_prefix=True).prefix_ids) == 11  # its token 11 predicts target 12: a row's own
    assert collate(lm_rows(16, [20, 6, 25]), 0, split_prefix=True).prefix_ids == []  # 5 tokens: not worth a pass


@pytest.mark.parametrize("kind,targets", CASES)
@pytest.mark.parametrize("targets_from", [[20, 18, 25, 17], [20, 12, 25, 30]])
def test_an_lm_batch_with_its_shared_start_run_once_has_the_whole_rows_loss_and_gradients(kind, targets, targets_from):
    host, adapter = host_with_trainable_adapter(kind, targets)
    rows = lm_rows(16, targets_from)
    split = collate(rows, 0, split_prefix=True)
    assert split.prefix_ids
    whole_loss, whole = loss_and_gradients(host, adapter, collate(rows, 0), objective="lm")
    split_loss, reused = loss_and_gradients(host, adapter, split, objective="lm")
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    for name, gradient in whole.items():
        torch.testing.assert_close(reused[name], gradient, rtol=1e-4, atol=1e-6)


def test_the_rows_drawn_do_not_depend_on_splitting():
    rows = rows_with_a_shared_start(10, count=13)
    plain, split = training_batches(rows, 4, 0, seed=5), training_batches(rows, 4, 0, seed=5, split_prefix=True)
    for _ in range(6):
        a, b = next(plain), next(split)
        assert b.prefix_ids
        for row in range(4):
            whole_row = a.input_ids[row][a.attention_mask[row] == 1].tolist()
            assert whole_row == b.prefix_ids + b.input_ids[row][b.attention_mask[row] == 1].tolist()


def test_only_a_model_without_dropout_shares_the_start_in_training():
    llama, _ = build_tiny_model("tiny-llama")
    gpt2, _ = build_tiny_model("tiny-gpt2")
    assert is_deterministic_in_training(llama)
    assert not is_deterministic_in_training(gpt2)  # attention/residual dropout 0.1: one pass would share its masks
    llama.config.attention_dropout = 0.1
    assert not is_deterministic_in_training(llama)
