"""Every method runs whole rounds on a tiny model (no FL engine), and the ClientApp keeps client state."""

from __future__ import annotations

import json
import math

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from aflora.base_sync import BaseSync
from aflora.flower import client_app, client_work
from aflora.flower.records import instruction_content
from aflora.methods import METHODS
from aflora.runtime import ServerRuntime

from helpers import run_inline, tiny_config


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_rounds_of_every_method(name, tmp_path):
    server = run_inline(tiny_config(tmp_path, f'method="{name}"'))
    before = server.evaluate()
    assert math.isfinite(before["loss"]) and 0.0 <= before["accuracy"] <= 1.0
    diagnostics = server.last_diagnostics
    assert diagnostics["aggregation_seconds"] >= 0
    exact = METHODS[name].exact_aggregation  # what the method declares, against what the round measured
    if exact is None:  # no single global product
        assert "aggregation_error" not in diagnostics
    elif exact:  # aggregate == Σ p_k B_k A_k up to float error
        assert diagnostics["aggregation_error"] < 1e-5
    else:
        assert diagnostics["aggregation_error"] > 0
    if name == "flexlora":
        assert diagnostics["truncation_loss"] > 0  # what the SVD redistribution loses, reported apart
    uploads = server.last_uploads
    assert sorted(u.client_id for u in uploads) == [0, 1, 2]
    assert all(u.trained_params > 0 for u in uploads)
    # the federated update reached the global model: either merged into the base or as a live adapter
    assert server.merges.by_round or server.method.global_adapter()


def test_client_app_keeps_local_state_between_rounds(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, 'method="fedsa_lora"')
    server = ServerRuntime(config)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    seen = []
    original = client_work.ClientRuntime.train

    def spy(self, instruction, sync, local_state=None):
        seen.append(local_state)
        return original(self, instruction, sync, local_state)

    monkeypatch.setattr(client_work.ClientRuntime, "train", spy)
    for attribute in ("_task_id", "_run_id", "_node_id"):  # what a Flower runtime sets before messages exist
        monkeypatch.setattr(TaskIdentity, attribute, 1)
    for round_ in (1, 2):
        instruction = server.method.instruct(1, round_)
        message = Message(content=instruction_content(instruction, BaseSync({}, []), config.to_dict()), dst_node_id=7, message_type="train")
        client_app.train(message, context)
    assert seen[0] is None
    assert set(seen[1]) == {f"B/{name}" for name in server.method.module_shapes}
    assert any(float(t.abs().sum()) > 0 for t in seen[1].values())  # the personal B it trained in round 1
    assert json.loads(json.dumps(config.to_dict()))  # the experiment travels as JSON


def test_local_test_rows_are_held_out_from_each_client():
    from aflora.runtime import hold_out_local_tests

    train, test = hold_out_local_tests([[0, 1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13]], 0.25, seed=0)
    assert [len(t) for t in test] == [2, 1]
    for rows, tr, te in zip([[0, 1, 2, 3, 4, 5, 6, 7], [10, 11, 12, 13]], train, test):
        assert sorted(tr + te) == rows and not set(tr) & set(te)
    assert hold_out_local_tests([[1, 2]], 0.0, seed=0) == ([[1, 2]], [[]])
    with pytest.raises(Exception, match="too few"):
        hold_out_local_tests([[1]], 0.5, seed=0)
