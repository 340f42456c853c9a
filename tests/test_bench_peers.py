"""bench/peers.py's pure parts: the peers get exactly aflora's rows, and score in their own prompt format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from aflora.data import topic_classification_task
from aflora.models import build_byte_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # noqa: E402  (bench/ is not a package)

ROWS = [{"text": f"article {i} about {word}", "label": i % 4} for i, word in enumerate(["a", "b", "c", "d", "e", "f", "g"])]


def test_export_round_trips_every_clients_rows_in_order(tmp_path):
    task = topic_classification_task()
    client_rows = [[0, 2, 4], [1, 3], [5, 6]]
    folder = peers.export_clients(task, ROWS, client_rows, tmp_path)
    assert folder == tmp_path / "3"
    exported = peers.read_exported(tmp_path, 3)
    for indices, records in zip(client_rows, exported, strict=True):
        assert [r["instruction"] for r in records] == [task.prompt(ROWS[i]) for i in indices]
        assert [task.label_for_word(r["output"]) for r in records] == [ROWS[i]["label"] for i in indices]
        assert all(r["input"] == "" for r in records)  # FederatedLLM then uses its template's no-input prompt


def test_exported_split_is_afloras_partition(tmp_path, data_dir):
    workload = peers.workload_for(peers.Scale(), str(data_dir))
    peers.export_clients(workload.bundle.task, workload.bundle.train, workload.client_rows, tmp_path)
    exported = peers.read_exported(tmp_path, len(workload.client_rows))
    for indices, records in zip(workload.client_rows, exported, strict=True):
        assert records == peers.peer_records(workload.bundle.task, [workload.bundle.train[i] for i in indices])
    texts = [r["instruction"] for records in exported for r in records]
    assert len(texts) == sum(len(c) for c in workload.client_rows)


def test_alpaca_prompt_ends_where_the_answer_starts():
    tokenizer = build_byte_tokenizer()
    task = topic_classification_task()
    encoder = peers.peer_encoder(tokenizer, task, 512, "alpaca", "Instruction:\n{instruction}\n\n### Response:\n")
    text = tokenizer.decode(encoder.encode_classification(ROWS[1]).input_ids)
    assert text.endswith("### Response:\n") and task.prompt(ROWS[1]) in text
    assert encoder.label_token_ids == [tokenizer(word).input_ids[0] for word in task.label_words]


def test_a_prompt_whose_answers_share_their_first_token_is_refused():
    # flowertune-llm's answer follows "### Response: "; a byte-level tokenizer makes that space every answer's first
    # token, so the label words could not be told apart (SmolLM2's tokenizer reads " World" as one token)
    with pytest.raises(ValueError, match="start with the same token"):
        peers.peer_encoder(build_byte_tokenizer(), topic_classification_task(), 512, "flowertune", None)


def test_peer_model_folder_keeps_smollm2s_rope_base_for_older_transformers(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "config.json").write_text('{"model_type": "llama", "dtype": "float32", "rope_parameters": {"rope_theta": 100000.0}}')
    (cache / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend", "backend": "tokenizers"}')
    (cache / "model.safetensors").write_bytes(b"weights")
    (cache / "tokenizer.json").write_text('{"model": {"type": "BPE", "merges": [["a", "b"], ["ab", "c"]]}}')
    folder = peers.peer_model_folder(cache, tmp_path / "peer")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "float32"
    assert json.loads((folder / "tokenizer_config.json").read_text()) == {"tokenizer_class": "PreTrainedTokenizerFast"}
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((folder / "tokenizer.json").read_text())["model"]["merges"] == ["a b", "ab c"]
