"""Attention for batches whose rows are laid end to end (`sft.batching: packed` or `padding_free`):
each row attends to its own earlier tokens only, computed one row at a time, so a step pays for the
rows' own lengths instead of the square of the whole bin.

transformers, given position ids that restart at every row, builds a block-diagonal causal mask and
hands SDPA the whole bin at once. With a variable-length kernel (flash-attention's varlen) that is
cheap; without one — SDPA on the CPU — every query still meets every key of its 512-token bin and
the mask throws most of that work away. Row by row it is about half the attention time on
bench/sft.py's bins (docs/benchmarks.md). The rows are cut with `split`, whose backward is one
concatenation; indexing each row out of the batch instead would give every row's backward a
gradient the size of the whole batch, which costs more than the mask saves.

Set only while a trainer steps (`rows_attention(model)`), never for generation or scoring: there
each query may attend to a cache of earlier keys, which this function does not handle."""

from __future__ import annotations

from contextlib import contextmanager

NAME = "posttrain_rows"


class _LastBatch:
    """The row lengths of the last position ids seen: every layer of one forward gets the same
    tensor, and reading it back from the device once per forward is enough."""

    position_ids = None
    lengths: list[list[int]] = []


def row_lengths(position_ids) -> list[list[int]]:
    """Per batch row, the lengths of its packed rows: a row starts wherever the position is 0 (and
    at the first token, whatever its position)."""
    if _LastBatch.position_ids is position_ids:
        return _LastBatch.lengths
    width = position_ids.shape[1]
    lengths = []
    for starts in (position_ids == 0).cpu().tolist():
        at = [i for i, start in enumerate(starts) if start or i == 0]
        lengths.append([end - begin for begin, end in zip(at, [*at[1:], width])])
    _LastBatch.position_ids, _LastBatch.lengths = position_ids, lengths
    return lengths


def attention_within_rows(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query (batch, heads, tokens, head dim), key and
    value with as many or fewer (grouped) heads; returns (batch, tokens, heads, head dim)."""
    import torch
    import torch.nn.functional as F

    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2]:
        raise ValueError(f"{NAME} attention needs position ids and no key cache: it is set only while training on packed or padding-free batches")
    grouped = query.shape[1] != key.shape[1]
    outputs = []
    for lengths, q, k, v in zip(row_lengths(position_ids), query.unbind(0), key.unbind(0), value.unbind(0)):
        parts = [
            F.scaled_dot_product_attention(q_row[None], k_row[None], v_row[None], dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped)
            for q_row, k_row, v_row in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))
        ]
        outputs.append(torch.cat(parts, 2))
    return torch.cat(outputs, 0).transpose(1, 2).contiguous(), None


@contextmanager
def rows_attention(model):
    """`model` (and any PEFT wrapper around it, which shares its config) attends within rows until
    the block ends, then goes back to its own attention."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention_within_rows)
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        _LastBatch.position_ids, _LastBatch.lengths = None, []
