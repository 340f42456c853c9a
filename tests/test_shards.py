"""Per-node data files: a deployed client sees only its rows and trains exactly as in simulation."""

from __future__ import annotations

import json

import pytest
import torch

from aflora.data import DataError
from aflora.deployment.shards import write_shards
from aflora.runtime import ClientRuntime, ServerRuntime, prepare_workload
from aflora.shards import read_shard, shard_path

from helpers import tiny_config


def test_shards_hold_each_clients_rows_and_nothing_else(tmp_path):
    config = tiny_config(tmp_path / "data", "data.local_test_fraction=0.25")
    paths = write_shards(config, tmp_path / "shards")
    workload = prepare_workload(config)
    assert len(paths) == 3
    for cid, path in enumerate(paths):
        task, train, test = read_shard(path)
        assert task == workload.bundle.task
        assert train == [workload.bundle.train[i] for i in workload.client_rows[cid]]
        assert test == [workload.bundle.train[i] for i in workload.client_test_rows[cid]]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["clients"]["1"] == {"train": len(workload.client_rows[1]), "test": len(workload.client_test_rows[1])}


def test_a_node_with_its_file_uploads_exactly_what_the_simulated_client_uploads(tmp_path):
    config = tiny_config(tmp_path / "data")
    write_shards(config, tmp_path / "shards")
    server = ServerRuntime(config)
    instruction, sync = list(server.instructions(1))[1]
    simulated = ClientRuntime(config).train(instruction, sync)
    node = ClientRuntime(config, client_id=1, data_file=shard_path(tmp_path / "shards", 1))
    assert [len(r) for r in node.workload.client_rows] == [0, len(prepare_workload(config).client_rows[1]), 0]
    deployed = node.train(instruction, sync)
    assert simulated.tensors.keys() == deployed.tensors.keys()
    for key in simulated.tensors:
        assert torch.equal(simulated.tensors[key], deployed.tensors[key]), key


def test_missing_data_file_is_explained(tmp_path):
    with pytest.raises(DataError, match="aflora partition"):
        read_shard(tmp_path / "client_0.jsonl")
