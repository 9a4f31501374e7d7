"""The frames the suites check: one row per record, plus the computed columns a suite names.

A suite JSON can only talk about columns, so what is not a plain field of a record (the dedup key,
"chosen == rejected", token counts as the trainer sees them) is computed here, once, next to the
suites that rely on it:

    frame = clean_frame({"train": rows, "eval": held_out}, ["prompt", "response"], ["prompt", "response"])
    validate(frame, "instruction_clean", out_dir)

Pure pandas (plus a tokenizer for `tokenized_frame`); no Great Expectations import, so building a
frame is cheap.
"""

from __future__ import annotations

import pandas as pd

from posttrain.formatting import IGNORE_INDEX, encode_example

DEDUP_KEY_SEPARATOR = "\x1f"  # unit separator: cannot occur in normalised text, so keys never collide by joining


def dedup_key(record: dict, dedup_fields: list[str]) -> str:
    return DEDUP_KEY_SEPARATOR.join(record[field] for field in dedup_fields)


def clean_frame(splits: dict[str, list[dict]], fields: list[str], dedup_fields: list[str]) -> pd.DataFrame:
    """Records of one role, all splits together (so uniqueness also means no train/eval overlap).

    Columns: the role's `fields` (+ "skill" when present), "split", "dedup_key", "text_chars"
    (prompt + the longest completion field) and, for preference pairs, "chosen_equals_rejected".
    Missing fields become nulls rather than errors, so the suite reports them as failures.
    """
    rows = []
    for split, records in splits.items():
        for record in records:
            row = {field: record.get(field) for field in fields}
            if "skill" in record:
                row["skill"] = record["skill"]
            row["split"] = split
            texts = [row[field] for field in fields]
            complete = all(isinstance(text, str) for text in texts)
            row["dedup_key"] = dedup_key(record, dedup_fields) if complete else None
            row["text_chars"] = len(texts[0]) + max(len(text) for text in texts[1:]) if complete else None
            if "chosen" in fields and "rejected" in fields:
                row["chosen_equals_rejected"] = row["chosen"] == row["rejected"]
            rows.append(row)
    columns = [*fields, "split", "dedup_key", "text_chars"]
    return pd.DataFrame(rows, columns=None if rows else columns)


def tokenized_frame(records: list[dict], tokenizer, max_length: int) -> pd.DataFrame:
    """Instruction records encoded exactly as our training loops encode them (encode_example).

    Columns: total_tokens, trainable_tokens (labels that count in the loss), truncated,
    trainable_fraction.
    """
    rows = []
    for record in records:
        encoded = encode_example(tokenizer, record["prompt"], record["response"], max_length=max_length)
        total = len(encoded["input_ids"])
        trainable = sum(label != IGNORE_INDEX for label in encoded["labels"])
        rows.append(
            {
                "total_tokens": total,
                "trainable_tokens": trainable,
                "truncated": encoded["truncated"],
                "trainable_fraction": trainable / total if total else 0.0,
            }
        )
    columns = ["total_tokens", "trainable_tokens", "truncated", "trainable_fraction"]
    return pd.DataFrame(rows, columns=columns)
