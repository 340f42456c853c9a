"""aflora.rounds without any FL engine: the round's steps, its returned record, the in-process transport."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from aflora.checkpoint import method_state
from aflora.methods import METHODS
from aflora.results import RunRecord
from aflora.rounds import InProcessTransport, run_round, run_rounds
from aflora.runtime import ClientRuntime, ServerRuntime

from helpers import tiny_config


def empty_record(config) -> RunRecord:
    return RunRecord(method=config.method, model=config.model.name, dataset="topics", num_clients=3, seed=0, config={}, base_params=1)


def test_run_rounds_scores_the_base_model_then_records_every_round_and_calls_back(tmp_path):
    config = tiny_config(tmp_path)
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    record, ended = empty_record(config), []
    run_rounds(server, transport, record, 1, 2, on_round_end=ended.append)
    assert ended == [1, 2] and [r.round for r in record.rounds] == [1, 2]
    assert 0.0 <= record.initial["accuracy"] <= 1.0 and record.initial["eval_seconds"] >= 0
    assert all(r.clients == [0, 1, 2] and r.failures == [] and r.aggregation_error is not None for r in record.rounds)


def test_a_crashing_client_is_a_failure_of_its_round_not_of_the_run(tmp_path):
    config = tiny_config(tmp_path, "engine.fail_clients=[1]", "engine.fail_from_round=1")
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    result = run_round(server, transport, 1)
    assert result.record.clients == [0, 2] and [u.client_id for u in result.uploads] == [0, 2]
    assert [f["client"] for f in result.record.failures] == [1] and "injected fault" in result.record.failures[0]["reason"]
    assert result.record.aggregation_error == result.diagnostics["aggregation_error"]


def test_personalized_evaluation_is_the_example_weighted_mean_over_the_clients(tmp_path):
    config = tiny_config(tmp_path, 'method="fedsa_lora"', "data.local_test_fraction=0.25")
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    personalized = run_round(server, transport, 1).record.personalized
    local_rows = sum(len(rows) for rows in server.workload.client_test_rows)
    assert personalized["clients"] == 3.0 and personalized["num_examples"] == local_rows
    assert set(transport.kept) == {0, 1, 2}  # each client's personal B, kept for its next round


def test_the_in_process_secure_round_matches_the_plain_round(tmp_path):
    """Clients fold their weights into the summands as under SecAgg+; their sum (unquantized) is the plain aggregate."""
    secure = ServerRuntime(tiny_config(tmp_path / "secure", "secagg.enabled=true"))
    plain = ServerRuntime(tiny_config(tmp_path / "plain"), secure.workload)
    run_round(plain, InProcessTransport(ClientRuntime(plain.config)), 1)
    result = run_round(secure, InProcessTransport(ClientRuntime(secure.config)), 1)
    assert result.record.clients == [0, 1, 2] and result.record.uplink_bytes["0"] > 0
    for name in plain.method.module_shapes:
        expected = plain.method.B_global[name]
        torch.testing.assert_close(secure.method.B_global[name], expected, rtol=0, atol=4 * 2.0**-24 * float(expected.abs().max()))


def test_a_method_added_in_one_class_and_one_registration_runs_and_reports_its_own_diagnostics(tmp_path, monkeypatch):
    """docs/methods.md 'Adding a method': the class and the registration line are all it takes, its own
    round_diagnostics included (they land in the record's method_diagnostics and in compare's columns)."""
    from aflora import methods
    from aflora.compare_table import _round_mean
    from aflora.methods.shared_lora import FedIT

    class HalfFedIT(FedIT):
        """FedIT that reports the norm of its averaged B (a made-up diagnostic)."""

        name = "half_fedit"

        def round_diagnostics(self) -> dict[str, float]:
            return {"b_norm": float(sum(f.B.norm() ** 2 for f in self.global_adapter().values()) ** 0.5)}

    monkeypatch.setitem(methods.METHODS, HalfFedIT.name, HalfFedIT)  # the registration line
    config = tiny_config(tmp_path, 'method="half_fedit"')
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    record = run_round(server, transport, 1).record
    assert record.method_diagnostics["b_norm"] > 0 and record.aggregation_error > 0
    as_json = {"rounds": [{"method_diagnostics": record.method_diagnostics}]}
    assert _round_mean("b_norm")(as_json) == record.method_diagnostics["b_norm"]


def test_the_final_evaluation_scores_data_final_eval_size_rows_once_after_the_last_round(tmp_path, caplog):
    """Its accuracy is results.json's final one, with a Wilson interval and every row's outcome; with the default
    ("eval_size") it scores the per-round rows again, so it agrees with the last round."""
    from aflora.intervals import expand_indices, unpack_bits, wilson_interval

    config = tiny_config(tmp_path)
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    record = empty_record(config)
    run_rounds(server, transport, record, 1, 2)
    record.finish(wall_seconds=1.0, final_ranks={}, precision="float32")
    final = record.final_eval
    assert (final["rows"], final["test_rows"], final["row_indices"]) == (32, 32, "0-31")  # eval_size 0: every test row
    correct = unpack_bits(final["correct"], final["rows"])
    assert final["accuracy"] == sum(correct) / 32 == record.rounds[-1].accuracy == record.final["accuracy"]
    assert record.final["accuracy_ci95"] == final["accuracy_ci95"] == wilson_interval(sum(correct), 32).as_list()
    assert record.rounds[-1].accuracy_ci95 == final["accuracy_ci95"] and record.initial["accuracy_ci95"][0] <= record.initial["accuracy"]
    assert record.final["eval_rows"] == 32 and final["extra"] == {}
    labels = [row["label"] for row in server.workload.final_test.rows]  # recall per label, counted here independently
    recall = {str(k): sum(hit for hit, label in zip(correct, labels) if label == k) / labels.count(k) for k in set(labels)}
    assert final["recall_by_label"] == pytest.approx(recall) and len(recall) > 1
    assert final["balanced_accuracy"] == pytest.approx(sum(recall.values()) / len(recall))
    assert final["majority_label_accuracy"] == max(map(labels.count, set(labels))) / 32

    larger = ServerRuntime(tiny_config(tmp_path / "b", "data.eval_size=8", 'data.final_eval_size="20"'))
    assert len(larger.workload.test_rows) == 8
    final = larger.evaluate_final()
    assert final["rows"] == 20 and len(expand_indices(final["row_indices"])) == 20 and len(unpack_bits(final["correct"], 20)) == 20
    with caplog.at_level("WARNING", logger="aflora.runtime.workload"):
        assert ServerRuntime(tiny_config(tmp_path / "c", "data.final_eval_size=5000")).workload.final_test.indices == list(range(32))
    assert "data.final_eval_size = 5000, but" in caplog.text and "all of them" in caplog.text


def test_the_final_evaluation_reuses_the_last_rounds_scores_of_the_same_rows_only_while_the_model_is_unchanged(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)  # data.final_eval_size = "eval_size": the final rows are the per-round rows
    server, transport = ServerRuntime(config), InProcessTransport(ClientRuntime(config))
    scored, score_rows = [], server.side.score_rows
    monkeypatch.setattr(server.side, "score_rows", lambda examples, *a, **k: scored.append(len(examples)) or score_rows(examples, *a, **k))
    record = empty_record(config)
    run_rounds(server, transport, record, 1, 2)
    assert scored == [32, 32, 32]  # rounds 0, 1 and 2; the final evaluation took round 2's outcomes
    reused = {k: v for k, v in record.final_eval.items() if k != "eval_seconds"}
    server.scored_now = None
    assert server.evaluate_final() == reused  # scoring the rows again gives the same record, to the last bit

    server.evaluate()
    replies = transport.train(3, server.instructions(3))
    server.complete_round(3, server.accept(3, replies.uploads, []))  # the global model changes
    scored.clear()
    assert server.evaluate_final()["accuracy"] is not None and scored == [32]  # so the rows are scored again


# ---------------------------------------------------------------------------- what the server keeps per client
def float_tensors(value, skip=()) -> Iterator[torch.Tensor]:
    """The floating-point tensors with data reachable from `value` through dicts, lists and aflora's objects; the
    objects in `skip` left out."""
    if any(value is s for s in skip):
        return
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not value.is_meta:
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from float_tensors(v, skip)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from float_tensors(v, skip)
    elif type(value).__module__.startswith("aflora") and hasattr(value, "__dict__"):
        yield from float_tensors(vars(value), skip)


def float_bytes(value, skip=(), besides=()) -> int:
    """Bytes of the distinct float tensor memory reachable from `value`, left out: the objects in `skip` and the
    memory of the tensors in `besides`."""
    storage = lambda t: t.untyped_storage()  # noqa: E731 - views and their tensor share it
    known = {storage(t).data_ptr() for t in besides}
    sizes = {storage(t).data_ptr(): storage(t).nbytes() for t in float_tensors(value, skip)}
    return sum(size for pointer, size in sizes.items() if pointer not in known)


def server_after_one_round(folder, name: str, clients: int) -> ServerRuntime:
    config = tiny_config(folder, f'method="{name}"', f"federation.num_clients={clients}",
                         "federation.client_ranks=[" + ",".join(["4"] * clients) + "]", "train.local_steps=1", "server.steps=1")
    server = ServerRuntime(config)
    run_round(server, InProcessTransport(ClientRuntime(config)), 1)
    return server


@pytest.mark.parametrize("name", sorted(METHODS))
def test_after_a_round_the_server_keeps_no_client_factors(name, tmp_path):
    """Per client the server keeps masks and counters, not the round's messages: after a round neither the method's
    state (what a checkpoint saves) nor the receipts of the sent instructions hold a tensor that grows with the
    number of clients. The round's merge and the global adapter are the method's own update and model, left out:
    FLoRA's and FedEx-LoRA's merge and FlexLoRA's global adapter stack every client's factors by design."""
    held = {}
    for clients in (2, 6):
        server = server_after_one_round(tmp_path / str(clients), name, clients)
        skip = (server.method.round_merge(), server.method.global_adapter())
        held[clients] = (float_bytes(method_state(server.method, server.constructed_keys), skip), float_bytes(server.sent))
    assert held[6] == held[2]
    assert held[2][1] == 0  # the receipts: shapes only (AFLoRA's masks are bool)


def test_a_round_builds_each_message_when_the_transport_takes_it(tmp_path):
    config = tiny_config(tmp_path)
    server = ServerRuntime(config)
    built = []
    instruct = server.method.instruct
    server.method.instruct = lambda cid, round_: built.append(cid) or instruct(cid, round_)
    messages = server.instructions(1)
    assert len(messages) == 3 and messages.client_ids == [0, 1, 2] and built == []
    first, _ = next(iter(messages))
    assert built == [0] and list(server.sent) == [0]
    receipt = server.sent[0]  # what client 0's reply is checked against: its masks, the A rows it was sent only as shapes
    assert all(t.is_meta != key.startswith("mask/") for key, t in receipt.tensors.items())
    assert {k: t.shape for k, t in receipt.tensors.items()} == {k: t.shape for k, t in first.tensors.items()}


@pytest.mark.parametrize("name", ["aflora", "fedit", "hetlora"])
def test_until_its_error_is_measured_the_aggregate_holds_the_uploads_not_copies(name, tmp_path):
    """The aggregation error (measured after the server step) needs every client's factors: the method holds the
    uploads themselves and rows of one shared A, plus per client its column weights (rank numbers per module), not a
    copy of B and A per client (on SmolLM2 at rank 16: 5 MB per sampled client at the server's peak)."""
    held = {}
    for clients in (2, 6):
        config = tiny_config(tmp_path / str(clients), f'method="{name}"', f"federation.num_clients={clients}",
                             "federation.client_ranks=[" + ",".join(["4"] * clients) + "]", "train.local_steps=1")
        server, client = ServerRuntime(config), ClientRuntime(config)
        uploads = [client.train(instruction, sync) for instruction, sync in server.instructions(1)]
        server.method.aggregate(server.accept(1, uploads, []), 1)
        held[clients] = float_bytes(method_state(server.method, server.constructed_keys),
                                    besides=[t for u in uploads for t in u.tensors.values()])
    column_weights = len(server.method.module_shapes) * 4 * 8  # rank 4, float64
    assert held[2] <= held[6] <= held[2] + 4 * column_weights
