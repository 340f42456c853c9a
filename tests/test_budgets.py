"""Device budgets → per-method ranks, checked against the memory/uplink formulas by hand."""

from __future__ import annotations

import pytest

from aflora.budgets import MB, DeviceBudget, ModelFootprint, max_rank_within, ranks_from_budgets
from aflora.methods import METHODS
from aflora.runtime import ServerRuntime

from helpers import tiny_config

FOOT = ModelFootprint(base_params=1_000_000, module_shapes={"q": (64, 64), "v": (32, 64)}, num_blocks=2, hidden_size=64, num_heads=4)


def test_max_rank_matches_the_formulas():
    batch, seq = 4, 32
    activations = 2 * (34 * seq * batch * 64 + 5 * 4 * seq**2 * batch)
    fixed = 4 * 1_000_000 + activations
    per_rank_trained = (64 + 64) + (64 + 32)  # A and B of q and v
    # memory for rank 10 exactly, generous uplink: the answer is 10
    budget = DeviceBudget(memory_mb=(fixed + 16 * per_rank_trained * 10) / MB, uplink_mb=100)
    assert max_rank_within(budget, FOOT, trained=frozenset("AB"), uploaded=frozenset("AB"), batch_size=batch, seq_len=seq) == 10
    # uplink for rank 7 of B only (64 + 32 floats per rank): B-only methods get 7
    budget = DeviceBudget(memory_mb=1000, uplink_mb=4 * 96 * 7 / MB)
    assert max_rank_within(budget, FOOT, trained=frozenset("B"), uploaded=frozenset("B"), batch_size=batch, seq_len=seq) == 7
    # the same uplink buys A+B methods fewer ranks: 4·(64+64+64+32)·r ≤ 4·96·7 → r = 3
    assert max_rank_within(budget, FOOT, trained=frozenset("AB"), uploaded=frozenset("AB"), batch_size=batch, seq_len=seq) == 3


def test_too_small_budget_is_named():
    with pytest.raises(ValueError, match=r"clients \[1\] cannot train even rank 1"):
        ranks_from_budgets([DeviceBudget(1000, 1), DeviceBudget(1, 1)], FOOT, trained=frozenset("AB"), uploaded=frozenset("AB"),
                           batch_size=1, seq_len=8)


def test_budgets_give_each_method_its_own_ranks(tmp_path):
    overrides = ["federation.memory_mb=[4000, 4000, 4000]", "federation.uplink_mb=[0.05, 0.02, 0.01]"]
    ranks = {}
    for method in ("aflora", "fedit"):
        server = ServerRuntime(tiny_config(tmp_path / method, f'method="{method}"', *overrides))
        ranks[method] = [c.max_rank for c in server.side.clients]
        per_rank_up = server.side.host.footprint().params_per_rank(METHODS[method].uploaded_factors)
        assert all(4 * per_rank_up * r <= up * MB < 4 * per_rank_up * (r + 1) for r, up in zip(ranks[method], (0.05, 0.02, 0.01)))
    assert all(a > f for a, f in zip(ranks["aflora"], ranks["fedit"]))  # B-only uploads fit more rank in the same uplink
