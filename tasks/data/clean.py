"""Steps 2-3: normalise text (NFKC, control characters, spaces) and drop empty/short/over-long rows."""

from __future__ import annotations

import re
import unicodedata

from posttrain.config import DataConfig
from posttrain.formatting import completion_text, prompt_text
from tasks.data.records import ROLE_FIELDS, Removals, Row

# C0 controls except \t (collapsed below) and \n (kept), DEL, and C1 controls.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t]+")


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)  # full-width forms, ligatures, NBSP -> plain
    text = _CONTROL.sub("", text)
    return _SPACES.sub(" ", text).strip()


def normalize(rows: list[Row]) -> None:
    for row in rows:
        row.record = {key: normalize_text(value) for key, value in row.record.items()}


def token_counts(tokenizer, prompts: list[str], completions: list[str]) -> list[int]:
    """Tokens training sees: prompt template + completion + EOS (as formatting.encode_example)."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = encode([prompt_text(text) for text in prompts]) if prompts else []
    completion_ids = encode([completion_text(text) for text in completions]) if completions else []
    return [len(p) + len(c) + 1 for p, c in zip(prompt_ids, completion_ids)]


def filter_rows(rows: list[Row], config: DataConfig, tokenizer, removals: Removals) -> list[Row]:
    """Drop empty, too-short, chosen == rejected, then over-long rows."""
    survivors = []
    for row in rows:
        record = row.record
        completions = [record[key] for key in ROLE_FIELDS[row.role][1:]]
        if not record["prompt"] or not all(completions):
            removals.add("empty", row)
        elif row.role == "preference" and record["chosen"] == record["rejected"]:
            removals.add("same_pair", row)
        elif min(len(text) for text in completions) < config.min_response_chars:
            removals.add("too_short", row)
        else:
            survivors.append(row)
    # Longest completion: a preference pair is trained on both sides, the longer one must fit.
    longest = [max((row.record[key] for key in ROLE_FIELDS[row.role][1:]), key=len) for row in survivors]
    counts = token_counts(tokenizer, [row.record["prompt"] for row in survivors], longest)
    kept = []
    for row, count in zip(survivors, counts):
        if count > config.max_tokens:
            removals.add("overlong", row, tokens=count)
        else:
            kept.append(row)
    return kept
