"""The tokenized contracts, run by the training stage that consumes the data, before its first step.

    encoded = {split: chat.encode_rows(rows, max_length=96) for split, rows in splits.items()}
    check_instruction_rows("sft", splits, encoded, out_dir, overlong="truncated")
    check_preference_rows("reward", pairs, {split: chat.split_replies(rows) for split, rows in pairs.items()}, 96, out_dir, overlong="dropped")

Each training stage encodes with its own tokenizer and chat template at its own `max_length`
(posttrain.formatting.ChatFormat) and hands those very encodings here, so the contract checks what
is trained on and nothing is tokenized twice. The check lives with the stage, not in the data stage: changing `sft.max_length` re-runs SFT, not the
data. Rows a rule flags — truncated, nothing left to train on, chosen and rejected identical as
trained on — go to `<out_dir>/rejected.jsonl` with the rule, the split and row number, and what
the stage does with them (`dropped`, `truncated`, or `kept`); validation results go to
`<out_dir>/contracts/<stage>_tokenized.json`. A failed critical expectation raises
ContractViolation (one line) and the stage's staging folder, with both files, is kept.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_contracts.check import validate
from data_contracts.frames import instruction_frame, pair_columns, preference_frame


def _write_flags(out_dir: Path, flagged: list[dict]) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with (Path(out_dir) / "rejected.jsonl").open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in flagged)


def _numbered(splits: dict[str, list]) -> list[tuple[str, int]]:
    return [(split, number) for split, items in splits.items() for number in range(1, len(items) + 1)]


def check_instruction_rows(stage: str, records: dict[str, list[dict]], encoded: dict[str, list[dict]], out_dir: Path, overlong: str) -> dict:
    """sft / distill. `encoded`: the stage's own ChatFormat.encode_rows output per split, at its
    max_length (what it trains on); `overlong`: what the stage does with a longer row."""
    frame = instruction_frame([example for split in records for example in encoded[split]])
    flagged = []
    for (split, number), truncated, trainable in zip(_numbered(records), frame["truncated"], frame["trainable_tokens"]):
        record = records[split][number - 1]
        if trainable == 0:
            flagged.append({"rule": "no_trainable_tokens", "action": "dropped", "split": split, "row": number, "prompt": record["prompt"]})
        elif truncated:
            flagged.append({"rule": "truncated", "action": overlong, "split": split, "row": number, "prompt": record["prompt"]})
    _write_flags(out_dir, flagged)
    return validate(frame, f"{stage}_tokenized", out_dir)


def check_preference_rows(
    stage: str, records: dict[str, list[dict]], parts: dict[str, list[dict]], max_length: int, out_dir: Path, overlong: str
) -> dict:
    """reward (`overlong="dropped"`: RewardTrainer drops longer pairs) / dpo ("truncated").
    `parts`: the stage's ChatFormat.split_replies output per split."""
    columns = pair_columns([pair for split in records for pair in parts[split]])
    frame = preference_frame(*columns, max_length=max_length, overlong=overlong)
    flagged = []
    for (split, number), truncated, identical in zip(_numbered(records), frame["truncated"], frame["identical"]):
        record = records[split][number - 1]
        if identical:
            flagged.append({"rule": "identical_as_trained", "action": "kept", "split": split, "row": number, "prompt": record["prompt"]})
        elif truncated:
            flagged.append({"rule": "truncated", "action": overlong, "split": split, "row": number, "prompt": record["prompt"]})
    _write_flags(out_dir, flagged)
    return validate(frame, f"{stage}_tokenized", out_dir)


__all__ = ["check_instruction_rows", "check_preference_rows"]
