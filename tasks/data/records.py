"""Rows as the data stage carries them, the role schemas, and the removal log (rejected.jsonl)."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLE_FIELDS = {
    "instruction": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt", "answer"),
}
# The field that plays "response" in a role: `dedup_key: [prompt, response]` means prompt+chosen
# for preference pairs and prompt+answer for prompts.
RESPONSE_ALIAS = {"instruction": "response", "preference": "chosen", "prompt": "answer"}
RULES = ("empty", "same_pair", "too_short", "overlong", "exact_dup", "near_dup", "decontaminated")


@dataclass
class Row:
    role: str
    record: dict  # normalised role fields (+ "skill")
    raw: dict  # as read, for rejected.jsonl
    source: str
    source_row: int

    def origin(self) -> dict:
        return {"source": self.source, "source_row": self.source_row}


@dataclass
class Removals:
    """Dropped rows by rule, in the order they were dropped (written to rejected.jsonl)."""

    counts: dict = field(default_factory=lambda: {rule: 0 for rule in RULES})
    entries: list = field(default_factory=list)

    def add(self, rule: str, row: Row, **detail) -> None:
        self.counts[rule] += 1
        self.entries.append({"rule": rule, **row.origin(), "record": row.raw, **detail})
