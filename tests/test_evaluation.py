"""Scoring with the shared prompt prefix computed once equals scoring every row whole."""

from __future__ import annotations

import random

import pytest
import torch

from aflora.encoding import MIN_SHARED_PREFIX, Encoded, shared_prefix
from aflora.evaluation import score_classification
from aflora.lora.factors import ModuleFactors
from aflora.lora.host import AdapterHost
from aflora.models import build_tiny_model

LABELS = [11, 12, 13]


def rows_with_a_shared_start(prefix_length: int, count: int = 21, seed: int = 0) -> list[Encoded]:
    """Rows that start with the same `prefix_length` tokens and then differ, at lengths from 1 to 20 more."""
    rng = random.Random(seed)
    start = [rng.randrange(3, 250) for _ in range(prefix_length)]
    return [Encoded(input_ids=start + [rng.randrange(3, 250) for _ in range(rng.randint(1, 20))], label=rng.randrange(3))
            for _ in range(count)]


def adapted_host(kind: str, targets: list[str]) -> AdapterHost:
    model, _ = build_tiny_model(kind)
    host = AdapterHost(model, targets)
    generator = torch.Generator().manual_seed(0)
    adapter = {name: ModuleFactors(A=torch.randn(4, n, generator=generator) * 0.3, B=torch.randn(m, 4, generator=generator) * 0.3)
               for name, (m, n) in host.module_shapes().items()}
    host.install(adapter, scaling=2.0)  # the prefix must be scored through the adapter too
    return host


@pytest.mark.parametrize("kind,targets", [("tiny-llama", ["q_proj", "v_proj"]), ("tiny-gpt2", ["c_attn"])])
def test_the_shared_prefix_scored_once_gives_every_row_its_whole_prompt_score(kind, targets):
    host = adapted_host(kind, targets)
    rows = rows_with_a_shared_start(16)
    whole = score_classification(host, rows, label_token_ids=LABELS, batch_size=4, pad_id=0, reuse_prefix=False)
    reused = score_classification(host, rows, label_token_ids=LABELS, batch_size=4, pad_id=0, reuse_prefix=True)
    torch.testing.assert_close(torch.tensor(reused.loss), torch.tensor(whole.loss), rtol=1e-5, atol=1e-5)
    assert reused.correct == whole.correct
    # Scoring only the rows' own tokens (the prefix dropped, not attended to) gives other losses: the test sees it.
    cut = [Encoded(input_ids=r.input_ids[16:], label=r.label) for r in rows]
    alone = score_classification(host, cut, label_token_ids=LABELS, batch_size=4, pad_id=0, reuse_prefix=False)
    assert (torch.tensor(alone.loss) - torch.tensor(whole.loss)).abs().max() > 1e-3


def test_the_shared_prefix_is_what_every_row_starts_with_and_leaves_each_its_last_token():
    assert shared_prefix([Encoded([1, 2, 3, 4, 9], 0), Encoded([1, 2, 3, 5], 1), Encoded([1, 2, 3, 4, 8, 8], 2)]) == [1, 2, 3]
    short = [Encoded([5, 6, 7], 0), Encoded([5, 6, 7, 8], 1)]
    assert shared_prefix(short) == [5, 6]  # the 3-token row keeps its last token
    assert shared_prefix([Encoded([5, 6, 7], 0), Encoded([4, 6, 7], 1)]) == []
    assert shared_prefix([]) == []
    assert MIN_SHARED_PREFIX > 1  # a short common start (e.g. one BOS token) is scored whole
