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
from aflora.flower.simulation import backend_config, simulate, simulated_workers
from aflora.flower.transport import send_bounded
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
    # what ran: the CPU by name, and the precision the server's model side chose for model.precision
    from aflora.machine import cpu_model
    from aflora.runtime import autocast_dtype

    assert run["environment"]["cpu"] == cpu_model()
    expected = "bfloat16 autocast" if autocast_dtype(config.model.precision, torch.nn.Linear(1, 1)) else "float32"
    assert run["environment"]["precision"] == expected
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


class FakeGrid:
    """Answers every pushed message except those of `stalled` clients (never); notes, at each push, how many
    messages were out and how many had been built."""

    def __init__(self, built: list[int], stalled: frozenset[int] = frozenset()) -> None:
        self.built, self.stalled = built, stalled
        self.out: dict[str, int] = {}
        self.answered = 0
        self.pushes: list[tuple[int, int, int]] = []  # (messages out after the push, built so far, answered so far)

    def push_messages(self, messages):
        for m in messages:
            m.metadata.message_id = f"id {m.i}"
            self.out[m.metadata.message_id] = m.i
        self.pushes.append((len(self.out), len(self.built), self.answered))
        return [f"id {m.i}" for m in messages]

    def pull_messages(self, ids):
        answered = [i for key in ids if (i := self.out.get(key)) is not None and i not in self.stalled]
        for i in answered:
            del self.out[f"id {i}"]
        self.answered += len(answered)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"id {i}", src_node_id=999)) for i in answered]


def numbered_messages(count: int, built: list[int]):
    for i in range(count):
        built.append(i)
        yield SimpleNamespace(i=i, metadata=SimpleNamespace(message_id="", dst_node_id=100 + i))


@pytest.mark.parametrize("gpus, client_gpus, workers, per_client", [(0, 0.25, 8, 0.0), (1, 1.0, 1, 1.0), (1, 0.25, 4, 0.25),
                                                                     (2, 0.25, 8, 0.25), (1, 0.1, 8, 0.1)])
def test_simulated_clients_share_a_gpu_by_engine_client_gpus(monkeypatch, tmp_path, gpus, client_gpus, workers, per_client):
    """The GPU path's placement, checked without a GPU: a 16-core machine with 2 cores per client has 8 CPU slots;
    GPUs cap the workers at GPUs / client_gpus, and Ray gets every GPU and each client its share."""
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    config = tiny_config(tmp_path, "engine.client_cpus=2", f"engine.client_gpus={client_gpus}")
    assert simulated_workers(config) == workers
    backend = backend_config(config)
    assert backend["client_resources"] == {"num_cpus": 2, "num_gpus": per_client}
    assert backend["init_args"]["num_gpus"] == gpus


def test_at_most_max_in_flight_messages_are_out_each_built_when_a_place_frees():
    built: list[int] = []
    grid = FakeGrid(built)
    replies = list(send_bounded(grid, numbered_messages(5, built), 2, timeout=10.0))
    assert sorted((reply.metadata.reply_to_message_id, node) for reply, node in replies) == [(f"id {i}", 100 + i) for i in range(5)]
    assert all(out <= 2 and existing <= answered + 2 for out, existing, answered in grid.pushes)
    every = FakeGrid(built := [])
    list(send_bounded(every, numbered_messages(5, built), 0, timeout=10.0))
    assert every.pushes[0] == (5, 5, 0)  # 0: all at once
    first, _ = next(send_bounded(FakeGrid(built := []), numbered_messages(5, built), 2, timeout=10.0))
    assert first.metadata.reply_to_message_id == "id 0" and built == [0, 1]  # a reply comes out before the rest go in


def test_a_stalled_client_holds_one_place_and_the_deadline_stops_the_rest():
    built: list[int] = []
    started = time.monotonic()
    replies = list(send_bounded(FakeGrid(built, stalled=frozenset({1})), numbered_messages(6, built), 2, timeout=0.5))
    assert 0.5 <= time.monotonic() - started < 5
    assert sorted(reply.metadata.reply_to_message_id for reply, _ in replies) == [f"id {i}" for i in (0, 2, 3, 4, 5)]
    built = []  # every place stalled: what was not sent by the deadline is never built, let alone sent
    replies = list(send_bounded(FakeGrid(built, stalled=frozenset({0, 1})), numbered_messages(6, built), 2, timeout=0.3))
    assert replies == [] and built == [0, 1]


def test_waves_do_not_change_the_result(finished_run, tmp_path):
    """The module's run had 2 messages out at a time (2 × its one worker); all 3 at once gives the same rounds."""
    config, _, out = finished_run
    simulate(tiny_config(tmp_path / "data", "rounds=2", "aflora.beta=1.0", "engine.max_in_flight=3"), tmp_path / "out")
    timing = {"round_seconds", "eval_seconds", "aggregation_seconds", "server_seconds", "train_seconds"}
    strip = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in run["rounds"]]  # noqa: E731
    assert strip(load_run(tmp_path / "out")) == strip(load_run(out))
