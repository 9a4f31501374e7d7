"""Rows as the data stage carries them, the role schemas, the removal log (rejected.jsonl) and
where each row came from.

Every row read gets a row id (0, 1, 2, … across all sources in config order); `Origins` maps an id
back to its source and source row in a few bytes per row, so a duplicate can name the row it
repeats long after that row's text has left memory.
"""

from __future__ import annotations

import bisect
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

ROLE_FIELDS = {
    "instruction": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt", "answer"),
}
# The field that plays "response" in a role: `dedup_key: [prompt, response]` means prompt+chosen
# for preference pairs and prompt+answer for prompts.
RESPONSE_ALIAS = {"instruction": "response", "preference": "chosen", "prompt": "answer"}
# In the order the stage applies them. The first two come from reading a record's schema: a chat
# whose last turn is not the assistant's, and hh-rlhf transcripts that share no prompt.
RULES = (
    "no_final_reply",
    "prompt_mismatch",
    "empty",
    "same_pair",
    "too_short",
    "overlong",
    "exact_dup",
    "near_dup",
    "decontaminated",
)


@dataclass
class Row:
    role: str
    record: dict  # normalised role fields (+ "messages" for a multi-turn chat, + "skill")
    raw: dict  # as read, for rejected.jsonl
    source: str
    source_row: int
    row_id: int = -1
    dedup_key: str = ""  # set by exact dedup, reused by the split hash and the clean frame

    def origin(self) -> dict:
        return {"source": self.source, "source_row": self.source_row}


class Origins:
    """Row id -> (source, source row); ids are handed out in reading order."""

    def __init__(self) -> None:
        self._starts: list[int] = []  # first row id of each source
        self._names: list[str] = []
        self._rows = array("q")  # source row number of every row id

    def start_source(self, name: str) -> None:
        self._starts.append(len(self._rows))
        self._names.append(name)

    def add(self, source_row: int) -> int:
        self._rows.append(source_row)
        return len(self._rows) - 1

    def __len__(self) -> int:
        return len(self._rows)

    def nbytes(self) -> int:
        return self._rows.itemsize * len(self._rows)

    def of(self, row_id: int) -> dict:
        source = self._names[bisect.bisect_right(self._starts, row_id) - 1]
        return {"source": source, "source_row": self._rows[row_id]}


@dataclass
class Removals:
    """Dropped rows by rule, streamed to rejected.jsonl, which is put in reading order (row id) on
    close: the file is then the same however the rows were batched (`data.batch_rows` is not part
    of the cache key).

    Also counts what cleaning changed without dropping a row (`normalised`: placeholder inputs
    removed, PII replaced), so the manifest can say how much of the text was rewritten.
    """

    path: Path | None = None
    counts: dict = field(default_factory=lambda: {rule: 0 for rule in RULES})
    normalised: dict = field(default_factory=dict)
    by_role: dict = field(default_factory=dict)  # role -> rule -> count, for the contract failure's line
    _handle: object = None
    _offsets: array = field(default_factory=lambda: array("q"))
    _row_ids: array = field(default_factory=lambda: array("q"))

    def __post_init__(self) -> None:
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._handle = Path(self.path).open("w+b")

    def add(self, rule: str, row: Row, **detail) -> None:
        self.counts[rule] += 1
        role_counts = self.by_role.setdefault(row.role, {})
        role_counts[rule] = role_counts.get(rule, 0) + 1
        if self._handle is not None:
            entry = {"rule": rule, **row.origin(), "record": row.raw, **detail}
            self._offsets.append(self._handle.tell())
            self._row_ids.append(row.row_id)
            self._handle.write(json.dumps(entry, ensure_ascii=False).encode() + b"\n")

    def count(self, what: str, amount: int = 1) -> None:
        if amount:
            self.normalised[what] = self.normalised.get(what, 0) + amount

    def close(self) -> None:
        if self._handle is None:
            return
        order = sorted(range(len(self._row_ids)), key=self._row_ids.__getitem__)
        if order != list(range(len(order))):
            sorted_path = Path(self.path).with_suffix(".sorted")
            with sorted_path.open("wb") as out:
                for position in order:
                    self._handle.seek(self._offsets[position])
                    out.write(self._handle.readline())
            self._handle.close()
            sorted_path.replace(self.path)
        else:
            self._handle.close()
        self._handle = None

    def __enter__(self) -> Removals:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
