"""Faults and bad replies: what the server accepts, records and survives; checkpoints and resuming."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from aflora.checkpoint import load_checkpoint
from aflora.errors import RoundAborted
from aflora.flower.simulation import simulate
from aflora.lora.host import AdapterHost
from aflora.methods.aggregation import pad_columns
from aflora.methods.base import tensor_key
from aflora.results import load_run
from aflora.runtime import ClientRuntime, ServerRuntime, model_side

from helpers import kill_run_after_round, record_differences, tiny_config, write_tiny_config_toml


@pytest.fixture
def one_round(tmp_path):
    """A server that sent round 1 to 3 clients, and their three honest uploads."""
    config = tiny_config(tmp_path, "federation.min_replies=2")
    server, client = ServerRuntime(config), ClientRuntime(config)
    uploads = [client.train(instruction, sync) for instruction, sync in server.instructions(1)]
    return server, uploads


def test_missing_replies_are_recorded_and_weights_renormalize(one_round):
    server, uploads = one_round
    failures: list[dict] = []
    accepted = server.accept(1, [uploads[0], uploads[2]], failures)  # client 1 crashed or timed out
    assert [u.client_id for u in accepted] == [0, 2]
    assert failures == [{"client": 1, "reason": "no reply (the client crashed, timed out or was unreachable)"}]
    server.complete_round(1, accepted)
    name = next(iter(server.method.module_shapes))
    raw = [math.log1p(u.ranks[name]) * u.num_examples for u in accepted]
    weights = [x / sum(raw) for x in raw]  # normalised over the clients that replied
    expected = sum(w * pad_columns(u.tensors[tensor_key("B", name)], server.sent[u.client_id].tensors[tensor_key("mask", name)], 8)
                   for w, u in zip(weights, accepted))
    torch.testing.assert_close(server.method.B_global[name], expected)


def corrupt(upload, how, server):
    bad = copy.deepcopy(upload)
    name = next(iter(server.method.module_shapes))
    key = tensor_key("B", name)
    if how == "rank above budget":
        bad.tensors[key] = torch.cat([bad.tensors[key], torch.zeros(bad.tensors[key].shape[0], 1)], dim=1)
    elif how == "missing key":
        del bad.tensors[key]
    elif how == "NaN":
        bad.tensors[key][0, 0] = float("nan")
    elif how == "Inf":
        bad.tensors[key][0, 0] = float("inf")
    elif how == "wrong dtype":
        bad.tensors[key] = bad.tensors[key].double()
    elif how == "growing mask":
        mask_key = tensor_key("next_mask", name)
        server.sent[bad.client_id].tensors[tensor_key("mask", name)][-1] = False  # it was told to drop the last dim
        bad.tensors[tensor_key("B", name)] = bad.tensors[key][:, :-1]
        bad.tensors[mask_key] = torch.ones_like(bad.tensors[mask_key])
    elif how == "unknown client":
        bad.client_id = 99
    elif how == "no examples":
        bad.num_examples = 0
    return bad


REASONS = {
    "rank above budget": "expected", "missing key": "missing", "NaN": "NaN or Inf", "Inf": "NaN or Inf",
    "wrong dtype": "float64", "growing mask": "grows", "unknown client": "not asked", "no examples": "num_examples",
}


@pytest.mark.parametrize("how", sorted(REASONS))
def test_malformed_replies_are_rejected_with_a_reason_and_the_round_goes_on(one_round, how):
    server, uploads = one_round
    failures: list[dict] = []
    bad = corrupt(uploads[1], how, server)
    accepted = server.accept(1, [uploads[0], bad, uploads[2]], failures)
    assert [u.client_id for u in accepted] == [0, 2]
    assert any(REASONS[how] in f["reason"] and f["reason"].startswith("rejected") for f in failures), failures
    server.complete_round(1, accepted)


def test_a_second_reply_from_the_same_client_is_rejected(one_round):
    server, uploads = one_round
    failures: list[dict] = []
    accepted = server.accept(1, [uploads[0], uploads[0], uploads[1], uploads[2]], failures)
    assert [u.client_id for u in accepted] == [0, 1, 2]
    assert failures == [{"client": 0, "reason": "rejected: a second reply from this client in the same round"}]


def test_too_few_replies_abort_the_round_without_touching_the_state(one_round):
    server, uploads = one_round
    masks = copy.deepcopy(server.method.masks)
    with pytest.raises(RoundAborted, match=r"round 1: 1 of 3 clients replied usably, fewer than federation.min_replies = 2"):
        server.accept(1, [uploads[0]], [])
    assert server.method.B_global == {} and server.method.masks.keys() == masks.keys()
    assert all(torch.equal(server.method.masks[c][n], masks[c][n]) for c in masks for n in masks[c])


# ---------------------------------------------------------------------------- through Flower


@pytest.mark.flower
def test_a_client_crashing_mid_run_is_survived_and_recorded(tmp_path):
    config = tiny_config(tmp_path, "federation.min_replies=2", "engine.fail_clients=[1]", "engine.fail_from_round=2")
    simulate(config, tmp_path / "out")
    rounds = load_run(tmp_path / "out")["rounds"]
    assert rounds[0]["clients"] == [0, 1, 2] and rounds[0]["failures"] == []
    assert rounds[1]["clients"] == [0, 2]
    assert len(rounds[1]["failures"]) == 1 and rounds[1]["failures"][0]["client"] == 1
    assert "injected fault" in rounds[1]["failures"][0]["reason"]


def assert_same_run(a, b):
    """Every recorded value (timings aside) and every tensor of the saved adapter, bit for bit."""
    compared = lambda run: {key: run[key] for key in ("initial", "rounds", "final_eval", "final")}  # noqa: E731
    differences = record_differences(compared(load_run(a)), compared(load_run(b)))
    assert not differences, "\n".join(differences)
    adapter_a, adapter_b = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert adapter_a.keys() == adapter_b.keys()
    differing = {k: float((adapter_a[k] - adapter_b[k]).abs().max()) for k in adapter_a if not torch.equal(adapter_a[k], adapter_b[k])}
    assert not differing, f"resumed adapter differs from the uninterrupted one (largest difference per tensor): {differing}"


@pytest.mark.parametrize(("overrides", "threads"), [((), 3), (("engine.threads=2",), 2)])
def test_every_runtime_computes_with_the_runs_thread_count(tmp_path, monkeypatch, overrides, threads):
    """Whatever the process or thread would use by default (here 1), training, scoring and merging run with
    engine.threads (0 = engine.client_cpus) threads: the simulation's server thread, a resumed server, Ray workers
    and deployed processes all add in the same order."""
    seen: list[int] = []

    def counting(function):
        return lambda *args, **kwargs: (seen.append(torch.get_num_threads()), function(*args, **kwargs))[1]

    for name in ("train_adapter", "score_classification"):
        monkeypatch.setattr(model_side, name, counting(getattr(model_side, name)))
    monkeypatch.setattr(AdapterHost, "merge_into_base", counting(AdapterHost.merge_into_base))
    config = tiny_config(tmp_path, "engine.client_cpus=3", "rounds=1", *overrides)
    previous = torch.get_num_threads()

    def one_round_in_a_fresh_thread() -> None:  # as Flower runs the ServerApp
        torch.set_num_threads(1)
        server, client = ServerRuntime(config), ClientRuntime(config)
        torch.set_num_threads(1)  # whatever else this thread ran in between
        uploads = [client.train(instruction, sync) for instruction, sync in server.instructions(1)]
        server.complete_round(1, server.accept(1, uploads, []))
        server.evaluate()

    try:
        worker = threading.Thread(target=one_round_in_a_fresh_thread)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(previous)
    assert len(seen) >= 5 and set(seen) == {threads}, seen  # 3 clients + the server's step, its merge, the evaluation


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    simulate(tiny_config(folder / "data", "rounds=3"), folder / "out")
    return folder / "out"


@pytest.mark.flower
def test_an_aborted_run_resumes_to_the_same_result(tmp_path, uninterrupted):
    config = tiny_config(tmp_path / "data", "rounds=3", "federation.min_replies=3", "engine.fail_clients=[2]", "engine.fail_from_round=3")
    with pytest.raises(RoundAborted):
        simulate(config, tmp_path / "out")
    state, record = load_checkpoint(tmp_path / "out")
    assert state["round"] == 2 and [r["round"] for r in record["rounds"]] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint").glob("round_*.pt")) == ["round_1.pt", "round_2.pt"]
    # A kill after the checkpoint but before its readable copy: record.json is stale, and never read back.
    (tmp_path / "out" / "checkpoint" / "record.json").write_text("{}")
    healed = tiny_config(tmp_path / "data", "rounds=3", "federation.min_replies=3")
    simulate(healed, tmp_path / "out", resume=True)
    assert_same_run(uninterrupted, tmp_path / "out")
    # the latest two checkpoints are kept, older ones deleted
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint").glob("round_*.pt")) == ["round_2.pt", "round_3.pt"]


@pytest.mark.flower
def test_a_killed_run_resumes_to_the_same_result(tmp_path, uninterrupted):
    """SIGKILL the whole `aflora run` process group mid-run, then `aflora run --resume`."""
    config_file = write_tiny_config_toml(tmp_path / "data", "rounds=3")
    out = tmp_path / "out"
    # A tiny round can end between the checkpoint poll and the kill, so the kill lands in round 2 or 3
    assert kill_run_after_round(config_file, out, 1, deadline=time.monotonic() + 240) in (1, 2)
    resumed = subprocess.run([sys.executable, "-m", "aflora", "run", "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(uninterrupted, out)


def test_the_run_comparison_sees_any_change_but_timings():
    """The resume and deployment tests compare records with record_differences: it must catch every change, down to
    a float's last bit, and ignore only how long things took."""
    record = {"rounds": [{"round": 1, "loss": 1.25, "ranks": {"0": 4}, "clients": [0, 1], "round_seconds": 3.0,
                          "aggregation_error": 1.99e-08, "train_seconds": {"0": float("nan")}}]}
    same = copy.deepcopy(record)
    same["rounds"][0].update(round_seconds=9.0, train_seconds={"0": 1.5})
    assert record_differences(record, same) == []
    changes = ({"loss": 1.26}, {"loss": math.nextafter(1.25, 2.0)}, {"ranks": {"0": 3}}, {"clients": [0]}, {"round": 2},
               {"loss": None}, {"extra": {}}, {"aggregation_error": 2.32e-08})
    for change in changes:
        changed = copy.deepcopy(record)
        changed["rounds"][0].update(change)
        assert record_differences(record, changed), change
