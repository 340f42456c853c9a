"""Client-side cost and uplink bytes, recomputed by hand for one tiny configuration."""

from __future__ import annotations

import pytest

from aflora.results import RunRecord, round_record

from helpers import run_inline, tiny_config

# tiny-llama (aflora.models.build_tiny_model): hidden 64, 4 heads of 16, 2 KV heads, MLP 128, 2 blocks,
# byte tokenizer of 259 tokens, tied embeddings. Adapted: q_proj (64 -> 64) and v_proj (64 -> 32) per block.
HIDDEN, KV_OUT, MLP, BLOCKS, VOCAB = 64, 32, 128, 2, 259
BASE_PARAMS = VOCAB * HIDDEN + BLOCKS * (
    HIDDEN * HIDDEN  # q
    + 2 * HIDDEN * KV_OUT  # k, v
    + HIDDEN * HIDDEN  # o
    + 3 * HIDDEN * MLP  # gate, up, down
    + 2 * HIDDEN  # two RMSNorms
) + HIDDEN  # final norm
OUT_FEATURES = [HIDDEN, KV_OUT] * BLOCKS  # m of every adapted module


def test_round_one_costs_match_hand_computation(tmp_path):
    config = tiny_config(tmp_path, "rounds=1")
    server = run_inline(config)
    assert server.side.host.base_param_count == BASE_PARAMS == 90_624

    uploads = server.last_uploads
    record = round_record(1, uploads, {"accuracy": 0.5, "loss": 1.0}, round_seconds=1.0, eval_seconds=1.0)
    for cid, rank in enumerate(config.federation.client_ranks):  # round 1: every mask is full
        trained = sum((m + 1) * rank for m in OUT_FEATURES)  # B (m × r) and Λ (r) per module
        uplink = sum(m * rank for m in OUT_FEATURES)  # B' = B·Λ
        mask_bytes = len(OUT_FEATURES) * rank  # the pruned mask for the next round, one byte per entry
        assert record.trained_params[str(cid)] == trained
        assert record.uplink_params[str(cid)] == uplink
        assert record.uplink_bytes[str(cid)] == 4 * uplink + mask_bytes

    run = RunRecord("aflora", "tiny-llama", "x", 3, 0, {}, base_params=BASE_PARAMS, rounds=[record])
    run.finish(wall_seconds=1.0, final_ranks={}, precision="float32")
    ranks = config.federation.client_ranks
    expected_pct = 100.0 * sum(sum((m + 1) * r for m in OUT_FEATURES) for r in ranks) / len(ranks) / BASE_PARAMS
    assert run.final["client_cost_pct"] == pytest.approx(expected_pct, rel=1e-12)
    assert run.final["uplink_bytes_total"] == sum(4 * sum(m * r for m in OUT_FEATURES) + 4 * r for r in ranks)
