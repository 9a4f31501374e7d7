"""Attention within packed rows gives the loss and gradients of transformers' own block-diagonal
mask on the same batch, on a Llama and on a Qwen2 with grouped key/value heads, and the model goes
back to its own attention afterwards."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.row_attention import NAME, row_lengths, rows_attention

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def packed_batch(lengths_per_row: list[list[int]]) -> dict:
    generator = torch.Generator().manual_seed(0)
    width = max(sum(lengths) for lengths in lengths_per_row)
    ids, positions, labels = [], [], []
    for lengths in lengths_per_row:
        padding = width - sum(lengths)
        ids.append(torch.randint(1, 64, (width,), generator=generator))
        positions.append(torch.cat([torch.arange(n) for n in [*lengths, padding] if n]))
        row_labels = ids[-1].clone()
        row_labels[sum(lengths):] = -100
        labels.append(row_labels)
    return {"input_ids": torch.stack(ids), "position_ids": torch.stack(positions), "labels": torch.stack(labels)}


@pytest.mark.parametrize("model_class, config", [(LlamaForCausalLM, LlamaConfig(**SHAPE)), (Qwen2ForCausalLM, Qwen2Config(**SHAPE, num_key_value_heads=2))])
def test_rows_attention_matches_the_block_diagonal_mask(model_class, config):
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="sdpa")
    batch = packed_batch([[5, 9, 3, 7], [24], [1, 11, 6]])  # the last row ends in 6 tokens of padding

    def loss_and_grads():
        model.zero_grad()
        output = model(**batch, use_cache=False)
        output.loss.backward()
        return output.logits.detach(), [p.grad.clone() for p in model.parameters()]

    reference_logits, reference_grads = loss_and_grads()
    with rows_attention(model):
        assert model.config._attn_implementation == NAME
        logits, grads = loss_and_grads()
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(logits, reference_logits, atol=1e-5), (logits - reference_logits).abs().max()
    assert all(torch.allclose(g, r, atol=1e-6) for g, r in zip(grads, reference_grads))

    # Without the rows' boundaries (one sequence per batch row) the logits differ: the test can fail.
    whole = {**batch, "position_ids": torch.arange(24).expand(3, 24)}
    with rows_attention(model):
        assert (model(**whole, use_cache=False).logits - reference_logits).abs().max() > 1e-3


def test_row_lengths_start_at_every_zero_position():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 0, 1, 2, 3]])
    assert row_lengths(positions) == [[3, 2, 1], [2, 4]]


def test_generation_with_a_cache_is_refused_not_silently_wrong():
    model = LlamaForCausalLM._from_config(LlamaConfig(**SHAPE), attn_implementation="sdpa")
    with rows_attention(model), pytest.raises(ValueError, match="no key cache"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
