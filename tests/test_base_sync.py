"""Every client process must train on the full global base: updates come from the message, the node's
state-dir or the run's shared store, and a gap is an error rather than silently wrong training."""

from __future__ import annotations

import pytest
import torch

from aflora.base_sync import BaseSync, MergeStore
from aflora.runtime import ClientRuntime, ServerRuntime

from helpers import tiny_config


@pytest.fixture
def two_rounds(tmp_path):
    """A server after two merged rounds, and the updates it merged."""
    config = tiny_config(tmp_path)
    server = ServerRuntime(config)
    client = ClientRuntime(config)
    for round_ in (1, 2):
        uploads = [client.train(i, s) for i, s in server.instructions(round_)]
        server.complete_round(round_, server.accept(round_, uploads, []))
    return config, server


def base_weights(runtime):
    host = runtime.side.host
    return {name: host.base_weight(name).detach().clone() for name in host.module_names}


def test_a_fresh_process_without_the_older_update_refuses_to_train(two_rounds):
    config, server = two_rounds
    fresh = ClientRuntime(config)
    only_latest = BaseSync(merges={2: server.merges.by_round[2]}, merged_rounds=[1, 2])
    with pytest.raises(RuntimeError, match=r"lacks the global update of round 1 .*state-dir"):
        fresh.sync_base(only_latest)


def test_a_nodes_state_dir_carries_updates_across_its_processes(two_rounds, tmp_path):
    config, server = two_rounds
    first = ClientRuntime(config, state_dir=tmp_path / "node")
    first.sync_base(BaseSync(merges={1: server.merges.by_round[1]}, merged_rounds=[1]))
    second = ClientRuntime(config, state_dir=tmp_path / "node")  # a new process for the next message
    second.sync_base(BaseSync(merges={2: server.merges.by_round[2]}, merged_rounds=[1, 2]))
    expected = base_weights(server)
    for name, weight in base_weights(second).items():
        assert torch.equal(weight, expected[name]), name


def test_simulation_workers_catch_up_from_the_shared_store(two_rounds, tmp_path):
    config, server = two_rounds
    store = MergeStore(tmp_path / "merges")
    for round_, update in server.merges.by_round.items():
        store.save(round_, update)
    worker = ClientRuntime(config)
    worker.sync_base(BaseSync(merges={}, merged_rounds=[1, 2], store=str(store.folder)))
    expected = base_weights(server)
    assert all(torch.equal(w, expected[n]) for n, w in base_weights(worker).items())


def test_unacknowledged_updates_are_sent_again(two_rounds):
    _, server = two_rounds
    assert sorted(server.base_sync(0).merges) == [2]  # round 1's update was acknowledged by client 0's round-2 reply
    # a message whose reply never comes (crash, timeout): the next one carries the same updates again
    assert sorted(server.base_sync(1).merges) == [2]
    assert sorted(server.base_sync(1).merges) == [2]
    server.acknowledge(1)  # a successful reply
    assert server.base_sync(1).merges == {}


def test_merges_travel_through_flower_records_with_every_factor():
    from aflora.flower.records import arrays_to_merges, merges_to_arrays
    from aflora.lora.factors import ModuleFactors

    g = torch.Generator().manual_seed(0)

    def factors(rank, **core):
        return ModuleFactors(A=torch.randn(rank, 3, generator=g), B=torch.randn(4, rank, generator=g), **core)

    merges = {1: {"layers.0.q": factors(2)},
              3: {"layers.0.q": factors(2, lam=torch.randn(2, generator=g)), "layers.1.v": factors(1, R=torch.randn(1, 1, generator=g))}}
    back = arrays_to_merges(merges_to_arrays(merges))
    assert {r: sorted(a) for r, a in back.items()} == {r: sorted(a) for r, a in merges.items()}
    for round_, adapter in merges.items():
        for name, module in adapter.items():
            sent, received = module.tensors(), back[round_][name].tensors()
            assert sent.keys() == received.keys() and all(torch.equal(sent[k], received[k]) for k in sent)
