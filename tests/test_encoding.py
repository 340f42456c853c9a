"""Prompts, label tokens and batches: the answer position is where the label words are scored."""

from __future__ import annotations

import pytest

from aflora.data import instruction_task, topic_classification_task
from aflora.encoding import IGNORE_INDEX, PromptEncoder, collate, evaluation_batches, training_batches
from aflora.models import build_byte_tokenizer


@pytest.fixture
def tokenizer():
    return build_byte_tokenizer()


def test_label_tokens_are_the_first_token_of_each_answer(tokenizer):
    encoder = PromptEncoder(tokenizer, topic_classification_task(), max_length=64)
    # Byte tokenizer: each word's first token is its first byte.
    assert encoder.label_token_ids == [tokenizer.convert_tokens_to_ids(w[0]) for w in ("World", "Sports", "Business", "Technology")]


def test_label_words_sharing_a_first_token_are_refused(tokenizer):
    task = topic_classification_task(label_words=("Sports", "Science", "World", "Business"))
    with pytest.raises(ValueError, match="start with the same token"):
        PromptEncoder(tokenizer, task, max_length=64)


def test_long_prompts_keep_their_start_and_their_question(tokenizer):
    encoder = PromptEncoder(tokenizer, topic_classification_task(), max_length=40)
    full = encoder.prompt_ids({"text": "x " * 500, "label": 0})
    cut = encoder.encode_classification({"text": "x " * 500, "label": 0}).input_ids
    assert len(cut) == 40
    assert cut[:10] == full[:10] and cut[-30:] == full[-30:]


def test_left_padding_puts_every_answer_position_last(tokenizer):
    encoder = PromptEncoder(tokenizer, topic_classification_task(), max_length=128)
    examples = [encoder.encode_classification({"text": t, "label": i}) for i, t in enumerate(["short", "a much longer news text"])]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch.input_ids[:, -1].tolist() == [e.input_ids[-1] for e in examples]
    assert batch.attention_mask[0, : batch.input_ids.shape[1] - len(examples[0].input_ids)].sum() == 0
    # positions count real tokens only, so a left-padded row sees the same positions as alone
    assert batch.position_ids[0, -len(examples[0].input_ids):].tolist() == list(range(len(examples[0].input_ids)))
    assert batch.labels.tolist() == [0, 1]


def test_lm_targets_cover_only_the_response(tokenizer):
    encoder = PromptEncoder(tokenizer, instruction_task(), max_length=256)
    record = {"instruction": "Say hi", "context": "", "response": "hi there", "category": "open_qa"}
    example = encoder.encode_lm(record)
    response_ids = tokenizer("hi there", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert example.input_ids[-len(response_ids):] == response_ids
    assert example.lm_labels == [IGNORE_INDEX] * (len(example.input_ids) - len(response_ids)) + response_ids


def test_training_batches_are_seeded_and_cover_every_example(tokenizer):
    encoder = PromptEncoder(tokenizer, topic_classification_task(), max_length=64)
    examples = [encoder.encode_classification({"text": f"text {i}", "label": i % 4}) for i in range(10)]
    first = [b.labels.tolist() for _, b in zip(range(5), training_batches(examples, 4, tokenizer.pad_token_id, seed=3))]
    again = [b.labels.tolist() for _, b in zip(range(5), training_batches(examples, 4, tokenizer.pad_token_id, seed=3))]
    assert first == again
    rows = [tuple(row[mask.bool()].tolist()) for _, b in zip(range(3), training_batches(examples, 4, tokenizer.pad_token_id, seed=3))
            for row, mask in zip(b.input_ids, b.attention_mask)]
    assert len(rows) == 12 and len(set(rows)) == 10  # the first epoch shows every example once
    assert sum(len(b.labels) for b in evaluation_batches(examples, 3, tokenizer.pad_token_id)) == 10
    with pytest.raises(ValueError, match="empty"):
        next(training_batches([], 4, 0, seed=0))
