"""End to end through Flower's simulation engine on a tiny random model: 3 heterogeneous clients, 2 rounds."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from aflora.encoding import PromptEncoder
from aflora.flower.simulation import simulate
from aflora.flower.transport import send_in_waves
from aflora.models import build_tiny_model
from aflora.outputs import export_merged_model
from aflora.results import load_run
from aflora.runtime import prepare_workload

from helpers import tiny_config

pytestmark = pytest.mark.flower


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    config = tiny_config(folder / "data", "rounds=2", "aflora.beta=1.0")
    record = simulate(config, folder / "out")
    return config, record, folder / "out"


def test_results_have_every_round_and_field(finished_run):
    config, record, out = finished_run
    run = load_run(out)
    for key in ("method", "model", "dataset", "num_clients", "seed", "config", "rounds", "final"):
        assert key in run
    assert run["method"] == "aflora" and run["num_clients"] == 3
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    for r in run["rounds"]:
        assert set(r["clients"]) == {0, 1, 2}
        for field in ("accuracy", "loss", "ranks", "trained_params", "uplink_params", "uplink_bytes", "round_seconds"):
            assert field in r
        assert 0.0 <= r["accuracy"] <= 1.0
    for field in ("accuracy", "client_cost_pct", "uplink_bytes_total", "wall_seconds"):
        assert field in run["final"]
    assert run["config"]["federation"]["client_ranks"] == [8, 4, 2]
    assert (out / "rounds.csv").read_text().count("\n") == 1 + 2 * 3
    for plot in ("accuracy.png", "ranks.png", "uplink.png"):
        assert (out / plot).stat().st_size > 1000


def test_heterogeneous_ranks_start_at_budgets_and_never_grow(finished_run):
    config, _, out = finished_run
    rounds = load_run(out)["rounds"]
    assert rounds[0]["ranks"] == {"0": 8.0, "1": 4.0, "2": 2.0}  # round 1 trains at each client's budget
    for cid in ("0", "1", "2"):
        assert rounds[1]["ranks"][cid] <= rounds[0]["ranks"][cid]
    assert rounds[0]["trained_params"]["0"] > rounds[0]["trained_params"]["1"] > rounds[0]["trained_params"]["2"]


def test_saved_adapter_reproduces_the_global_model_under_stock_peft(finished_run):
    """Original tiny weights + results/adapter under stock PEFT score the test rows exactly as the server did."""
    config, _, out = finished_run
    run = load_run(out)
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert set(adapter_config["rank_pattern"].values()) == {16}  # two merged rounds × r_max = 8

    fresh, tokenizer = build_tiny_model("tiny-llama", seed=config.seed)
    model = PeftModel.from_pretrained(fresh, out / "adapter").eval()
    workload = prepare_workload(config)
    encoder = PromptEncoder(tokenizer, workload.bundle.task, config.data.max_length)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for row in workload.test_rows:
            example = encoder.encode_classification(row)
            logits = model(torch.tensor([example.input_ids])).logits[0, -1, encoder.label_token_ids]
            correct += int(logits.argmax()) == example.label
            loss -= float(torch.log_softmax(logits, dim=-1)[example.label])
    n = len(workload.test_rows)
    assert correct / n == run["final"]["accuracy"]
    assert loss / n == pytest.approx(run["final"]["loss"], rel=1e-4)


def test_export_merges_the_adapter_into_a_standalone_model(finished_run, tmp_path):
    config, _, out = finished_run
    export_merged_model(out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    fresh, tokenizer = build_tiny_model("tiny-llama", seed=config.seed)
    reference = PeftModel.from_pretrained(fresh, out / "adapter").eval()
    ids = torch.tensor([tokenizer("Election news from the border").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_fedsa_lora_personal_models_are_scored_on_local_test_rows(tmp_path):
    """Through Flower's evaluate messages: each client pairs the shared A with its own B (kept in its Context)."""
    config = tiny_config(tmp_path / "data", 'method="fedsa_lora"', "data.local_test_fraction=0.25")
    simulate(config, tmp_path / "out")
    run = load_run(tmp_path / "out")
    workload = prepare_workload(config)
    local_rows = sum(len(rows) for rows in workload.client_test_rows)
    for r in run["rounds"]:
        assert r["personalized"]["clients"] == 3.0 and r["personalized"]["num_examples"] == local_rows
        assert 0.0 <= r["personalized"]["accuracy"] <= 1.0
        assert r["eval_uplink_bytes"] > 0 and r["aggregation_error"] is None
    assert run["final"]["personalized_accuracy"] == run["rounds"][-1]["personalized"]["accuracy"]
    # personal and global models differ: the global one uses the mean of the personal B's
    assert set(run["rounds"][-1]["personalized"]) >= {"accuracy", "loss"}


class CountingGrid:
    """Replies to every message at once; notes each wave's size and how many messages existed when it was sent."""

    def __init__(self, built: list[int], delay: float = 0.0) -> None:
        self.built, self.delay = built, delay
        self.waves: list[tuple[int, int, float]] = []

    def send_and_receive(self, messages, *, timeout):
        messages = list(messages)
        self.waves.append((len(messages), len(self.built), timeout))
        time.sleep(self.delay)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"id {m.i}", src_node_id=100 + m.i))
                for m in messages]


def test_messages_go_out_in_waves_built_as_they_are_sent():
    built: list[int] = []

    def messages():
        for i in range(5):
            built.append(i)
            yield SimpleNamespace(i=i, metadata=SimpleNamespace(message_id=f"id {i}", dst_node_id=100 + i))

    grid = CountingGrid(built, delay=0.05)
    replies = send_in_waves(grid, messages(), 2, timeout=10.0)
    assert [(reply.metadata.reply_to_message_id, node) for reply, node in replies] == [(f"id {i}", 100 + i) for i in range(5)]
    assert [(n, existing) for n, existing, _ in grid.waves] == [(2, 2), (2, 4), (1, 5)]  # never more than a wave ahead
    timeouts = [t for _, _, t in grid.waves]
    assert timeouts[0] <= 10.0 and all(later <= earlier - 0.04 for earlier, later in zip(timeouts, timeouts[1:]))  # one deadline
    every = CountingGrid([])
    send_in_waves(every, (SimpleNamespace(i=i, metadata=SimpleNamespace(message_id=f"id {i}", dst_node_id=i)) for i in range(5)), 0,
                  timeout=10.0)
    assert [n for n, _, _ in every.waves] == [5]


def test_waves_do_not_change_the_result(finished_run, tmp_path):
    """The module's run sent 2 messages at a time (2 × its one worker); all 3 at once gives the same rounds."""
    config, _, out = finished_run
    simulate(tiny_config(tmp_path / "data", "rounds=2", "aflora.beta=1.0", "engine.max_in_flight=3"), tmp_path / "out")
    timing = {"round_seconds", "eval_seconds", "aggregation_seconds", "server_seconds", "train_seconds"}
    strip = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in run["rounds"]]  # noqa: E731
    assert strip(load_run(tmp_path / "out")) == strip(load_run(out))
