"""From records to token batches: chat-formatted prompts, label-word targets, left-padded batches.

Classification is scored by the logit of each label word's first token at the answer position,
so a single forward pass scores every class and accuracy is deterministic (no sampling).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from .config import MIN_MAX_LENGTH
from .data import Task

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    label: int | None = None  # class index (classification / multiple choice)
    lm_labels: list[int] | None = None  # per-token targets (IGNORE_INDEX on the prompt)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None  # class indices, or token targets for the LM objective
    prefix_ids: list[int] = field(default_factory=list)  # tokens every row starts with, left out of input_ids

    @property
    def num_tokens(self) -> int:
        """Tokens the rows hold, the shared prefix counted once per row (what a client trained on)."""
        return int(self.attention_mask.sum()) + len(self.prefix_ids) * self.input_ids.shape[0]


class PromptEncoder:
    """Turns a task's records into token ids for one tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, task: Task, max_length: int) -> None:
        if max_length < MIN_MAX_LENGTH:
            raise ValueError(f"data.max_length must be at least {MIN_MAX_LENGTH} tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.label_token_ids = self._label_token_ids() if task.label_words else []

    def prompt_ids(self, record: dict) -> list[int]:
        messages = [{"role": "user", "content": self.task.prompt(record)}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_classification(self, record: dict) -> Encoded:
        return Encoded(input_ids=self._fit(self.prompt_ids(record), reserve=0), label=self.task.label(record))

    def encode_lm(self, record: dict) -> Encoded:
        """Prompt followed by the response and end-of-turn; only the response is a target."""
        response = self.tokenizer(self.task.response(record), add_special_tokens=False).input_ids
        response = response[: self.max_length // 2] + [self.tokenizer.eos_token_id]
        prompt = self._fit(self.prompt_ids(record), reserve=len(response))
        return Encoded(input_ids=prompt + response, lm_labels=[IGNORE_INDEX] * len(prompt) + response)

    def _fit(self, ids: list[int], reserve: int) -> list[int]:
        """Cut the middle of an over-long prompt: keep the template's start and the question at the end."""
        budget = self.max_length - reserve
        if len(ids) <= budget:
            return ids
        head = budget // 4
        return ids[:head] + ids[len(ids) - (budget - head):]

    def _label_token_ids(self) -> list[int]:
        """The token each label word starts with when it opens the assistant's answer."""
        cue = self.tokenizer.apply_chat_template([{"role": "user", "content": "?"}], add_generation_prompt=True, tokenize=False)
        cue_ids = self.tokenizer(cue, add_special_tokens=False).input_ids
        ids = []
        for word in self.task.label_words:
            full = self.tokenizer(cue + word, add_special_tokens=False).input_ids
            if full[: len(cue_ids)] != cue_ids or len(full) == len(cue_ids):
                raise ValueError(f"label word {word!r} merges with the answer cue in this tokenizer; choose another word")
            ids.append(full[len(cue_ids)])
        if len(set(ids)) != len(ids):
            raise ValueError(
                f"label words {list(self.task.label_words)} start with the same token for this tokenizer "
                f"({ids}); choose label words whose first tokens differ"
            )
        return ids


MIN_SHARED_PREFIX = 8  # tokens; a shorter common start is not worth its extra forward pass


def shared_prefix(examples: Sequence[Encoded]) -> list[int]:
    """The tokens every row starts with, leaving each row at least its last token (where the answer is read)."""
    if not examples:
        return []
    first = examples[0].input_ids
    length = min(len(e.input_ids) for e in examples) - 1
    for example in examples[1:]:
        ids = example.input_ids
        length = next((i for i in range(length) if ids[i] != first[i]), length)
    return first[:max(length, 0)]


def first_target(lm_labels: Sequence[int]) -> int:
    """Position of a row's first target token (its length when it has none)."""
    return next((i for i, t in enumerate(lm_labels) if t != IGNORE_INDEX), len(lm_labels))


def collate(examples: Sequence[Encoded], pad_id: int, *, split_prefix: bool = False) -> Batch:
    """Left-pad so every row's last position is its answer position; positions count real tokens only.

    With `split_prefix`, the rows' shared start (chat template + instruction, at least MIN_SHARED_PREFIX tokens)
    goes to `prefix_ids` and the rows keep the rest: the model runs it once for the batch (`training.batch_loss`).
    For LM rows it ends before the token ahead of the first target, whose prediction is read at that token."""
    prefix = shared_prefix(examples) if split_prefix else []
    if prefix and examples[0].lm_labels is not None:
        prefix = prefix[:min(first_target(e.lm_labels) for e in examples) - 1]
    if len(prefix) < MIN_SHARED_PREFIX:
        prefix = []
    if prefix:
        cut = len(prefix)
        examples = [Encoded(e.input_ids[cut:], e.label, None if e.lm_labels is None else e.lm_labels[cut:]) for e in examples]
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, width - n:] = torch.tensor(example.input_ids)
        attention[row, width - n:] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp_min(0)
    labels = None
    if examples[0].lm_labels is not None:
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            labels[row, width - len(example.lm_labels):] = torch.tensor(example.lm_labels)
    elif examples[0].label is not None:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return Batch(input_ids, attention, position_ids, labels, prefix_ids=prefix)


def training_batches(examples: Sequence[Encoded], batch_size: int, pad_id: int, *, seed: int,
                     split_prefix: bool = False) -> Iterator[Batch]:
    """Endless seeded shuffled batches (epochs reshuffle): local training is counted in steps. `split_prefix`:
    see `collate`; the rows drawn do not depend on it."""
    if not examples:
        raise ValueError("cannot train on an empty dataset")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in chosen], pad_id, split_prefix=split_prefix)


def evaluation_order(examples: Sequence[Encoded]) -> list[int]:
    """The positions of `examples` by length: batches of similar length waste less padding."""
    return sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))


def evaluation_batches(examples: Sequence[Encoded], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Batches in `evaluation_order`; no metric depends on the order, per-row outcomes are put back in place."""
    order = evaluation_order(examples)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)
