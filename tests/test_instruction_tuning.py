"""Instruction tuning (Dolly, response-token LM loss) with MMLU scored as an extra benchmark, tiny model."""

from __future__ import annotations

import math

import pytest

from aflora.config import load_config
from aflora.intervals import unpack_bits
from aflora.runtime import prepare_workload

from helpers import run_inline


def dolly_config(data_dir, *overrides):
    return load_config(None, [
        f'data.data_dir="{data_dir}"',
        'data.dataset="dolly"',
        'data.partition="fedit_epsilon"',
        "data.epsilon=0.5",
        "data.train_size=90",
        "data.public_size=6",
        "data.eval_size=12",
        'data.extra_eval=["mmlu"]',
        "data.max_length=64",
        'model.name="tiny-llama"',
        'model.precision="fp32"',
        "federation.num_clients=3",
        "federation.client_ranks=[4,2,2]",
        "train.local_steps=2",
        "train.batch_size=2",
        "server.steps=1",
        "server.batch_size=2",
        "rounds=1",
        *overrides,
    ])


def test_dolly_round_trains_on_responses_and_scores_mmlu(data_dir):
    config = dolly_config(data_dir)
    workload = prepare_workload(config)
    assert workload.objective == "lm"
    assert sum(len(rows) for rows in workload.client_rows) == 90
    categories = [{workload.bundle.train[i]["category"] for i in rows} for rows in workload.client_rows]
    assert all(categories)
    assert len(workload.extra_eval["mmlu"].test) == 12

    server = run_inline(config)
    metrics = server.evaluate()
    assert set(metrics) >= {"loss", "mmlu/accuracy", "mmlu/loss"}
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    assert metrics["mmlu/accuracy"] in {k / 12 for k in range(13)}
    assert server.method.round_merge() is not None  # the round's update was merged into the base

    final = server.evaluate_final()  # the default final_eval_size: the per-round rows, extra benchmark included
    assert final["accuracy"] is None and "correct" not in final and final["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    mmlu = final["extra"]["mmlu"]
    assert mmlu["rows"] == 12 and mmlu["accuracy"] == pytest.approx(metrics["mmlu/accuracy"])
    assert len(unpack_bits(mmlu["correct"], 12)) == 12 and mmlu["accuracy_ci95"][0] <= mmlu["accuracy"] <= mmlu["accuracy_ci95"][1]
