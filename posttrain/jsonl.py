"""Read and write JSON-lines files (one record per line): the format of every data split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def read_preference_pairs(path: str | Path) -> list[dict]:
    """Preference rows from one split, checked: every row needs non-empty prompt/chosen/rejected strings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: preference split not found (is `data` a data-stage artifact?)")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no preference rows")
    for number, row in enumerate(rows, start=1):
        for key in PAIR_FIELDS:
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path} row {number}: key {key!r} must be a non-empty string")
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"{path} row {number}: chosen and rejected are identical")
    return rows


def read_instruction_rows(path: str | Path) -> list[dict]:
    """Instruction rows from one split, checked: every row needs string `prompt` and `response`,
    and `messages`, where present, is a list of {role, content} turns ending with the assistant's."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found (the data artifact has no instruction split)")
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path} row {number}: key {key!r} must be a string")
        turns = row.get("messages")
        if turns is not None and (
            not isinstance(turns, list)
            or not turns
            or not all(isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in turns)
            or turns[-1]["role"] != "assistant"
        ):
            raise ValueError(f"{path} row {number}: key 'messages' must be a list of {{role, content}} turns ending with the assistant's")
    return rows
