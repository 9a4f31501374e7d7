"""The tokenized contracts, run by the training stage that consumes the data, before its first step.

    check_instruction_rows("sft", tokenizer, {"train": rows, "eval": held_out}, 96, out_dir, overlong="truncated")
    check_preference_rows("reward", tokenizer, {"train": pairs}, 96, out_dir, overlong="dropped")

Each training stage tokenizes with its own tokenizer and template at its own `max_length`, so the
check lives with the stage, not in the data stage: changing `sft.max_length` re-runs SFT, not the
data. Rows a rule flags — truncated, nothing left to train on, chosen and rejected identical as
trained on — go to `<out_dir>/rejected.jsonl` with the rule, the split and row number, and what
the stage does with them (`dropped`, `truncated`, or `kept`); validation results go to
`<out_dir>/contracts/<stage>_tokenized.json`. A failed critical expectation raises
ContractViolation (one line) and the stage's staging folder, with both files, is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data_contracts.check import validate
from data_contracts.frames import instruction_tokens, preference_frame, preference_tokens, sft_frame


def _write_flags(out_dir: Path, flagged: list[dict]) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with (Path(out_dir) / "rejected.jsonl").open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in flagged)


def _splits_frame(splits: dict[str, list[dict]], build) -> tuple[pd.DataFrame, list[tuple[str, int, dict]]]:
    rows = [(split, number, record) for split, records in splits.items() for number, record in enumerate(records, start=1)]
    return build([record for _, _, record in rows]), rows


def check_instruction_rows(
    stage: str, tokenizer, splits: dict[str, list[dict]], max_length: int, out_dir: Path, overlong: str
) -> dict:
    """sft / distill: `overlong` is what the stage does with a row over max_length ("truncated")."""
    frame, rows = _splits_frame(splits, lambda records: sft_frame(*instruction_tokens(tokenizer, records), max_length))
    flagged = []
    for (split, number, record), truncated, trainable in zip(rows, frame["truncated"], frame["trainable_tokens"]):
        if trainable == 0:
            flagged.append({"rule": "no_trainable_tokens", "action": "dropped", "split": split, "row": number, "prompt": record["prompt"]})
        elif truncated:
            flagged.append({"rule": "truncated", "action": overlong, "split": split, "row": number, "prompt": record["prompt"]})
    _write_flags(out_dir, flagged)
    return validate(frame, f"{stage}_tokenized", out_dir)


def check_preference_rows(
    stage: str, tokenizer, splits: dict[str, list[dict]], max_length: int, out_dir: Path, overlong: str
) -> dict:
    """reward (`overlong="dropped"`: RewardTrainer drops longer pairs) / dpo ("truncated")."""
    frame, rows = _splits_frame(
        splits, lambda records: preference_frame(*preference_tokens(tokenizer, records), max_length=max_length, overlong=overlong)
    )
    flagged = []
    for (split, number, record), truncated, identical in zip(rows, frame["truncated"], frame["identical"]):
        if identical:
            flagged.append({"rule": "identical_as_trained", "action": "kept", "split": split, "row": number, "prompt": record["prompt"]})
        elif truncated:
            flagged.append({"rule": "truncated", "action": overlong, "split": split, "row": number, "prompt": record["prompt"]})
    _write_flags(out_dir, flagged)
    return validate(frame, f"{stage}_tokenized", out_dir)


__all__ = ["check_instruction_rows", "check_preference_rows"]
