"""completion_scores batches rows by length under a token budget; its figures must not depend on that."""

from __future__ import annotations

import random

import torch

from posttrain.formatting import ChatFormat
from posttrain.config import TinyModelConfig
from posttrain.models import build_tiny
from posttrain.scoring import completion_scores, length_batches


def test_length_batches_respect_rows_and_padded_tokens_and_cover_every_row():
    lengths = [random.Random(0).randint(1, 300) for _ in range(500)]
    batches = length_batches(lengths, max_rows=16, max_tokens=1024)
    assert sorted(index for batch in batches for index in batch) == list(range(500))
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 1024
    assert length_batches([5000, 3], max_rows=8, max_tokens=100) == [[1], [0]]  # an over-long row gets its own batch


def test_scores_and_predictions_do_not_depend_on_batching():
    model, tokenizer = build_tiny(TinyModelConfig(hidden_size=32, num_layers=1), seed=0)
    rng = random.Random(1)
    rows = [{"prompt": "x" * rng.randint(1, 40), "response": "y" * rng.randint(1, 40)} for _ in range(50)]
    examples = ChatFormat(tokenizer).encode_rows(rows, max_length=96)
    loss, predictions = completion_scores(model, examples, tokenizer.pad_token_id, batch_size=64, max_tokens=16384)
    one_by_one = [completion_scores(model, [example], tokenizer.pad_token_id) for example in examples]
    # Predictions come back in the examples' order, whatever order the batches ran in.
    assert torch.equal(predictions, torch.cat([p for _, p in one_by_one]))
    tokens = [len(p) for _, p in one_by_one]
    assert abs(loss - sum(row_loss * n for (row_loss, _), n in zip(one_by_one, tokens)) / sum(tokens)) < 1e-5
    small_loss, small_predictions = completion_scores(model, examples, tokenizer.pad_token_id, batch_size=3, max_tokens=200)
    assert abs(small_loss - loss) < 1e-5 and torch.equal(small_predictions, predictions)
