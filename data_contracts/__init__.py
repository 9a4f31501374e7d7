"""Data contracts: Great Expectations suites, one JSON file per edge of the pipeline.

    instruction_clean.json   data (raw -> clean) -> sft, distill   <data>/instruction/{train,eval}.jsonl
    preference_clean.json    data (raw -> clean) -> reward, dpo    <data>/preference/{train,eval}.jsonl
    prompt_clean.json        data (raw -> clean) -> grpo/ppo       <data>/prompt/{train,eval}.jsonl
    sft_tokenized.json       data -> sft       conversations as ChatFormat encodes them at sft.max_length
    distill_tokenized.json   data -> distill   the same at distill.max_length
    reward_tokenized.json    data -> reward    pairs at reward.max_length (longer pairs are dropped)
    dpo_tokenized.json       data -> dpo       pairs at align.dpo.max_length (longer pairs are truncated)

The *_clean suites run in the data stage; each *_tokenized suite runs in the stage it names,
before that stage's first training step (`tokenized.check_instruction_rows` and
`check_preference_rows`), so a stage's max_length is part of that stage's cache key only.

`frames` turns records (or token counts) into the frame a suite expects; `check.ContractRun` runs
suites and builds Data Docs; `check.validate` runs one suite and raises `ContractViolation` on a
failed critical expectation. Suites are data: to tighten a contract, edit its JSON (every
expectation needs `meta.severity`: critical | warning).
"""

from data_contracts.check import (
    ContractRun,
    ContractViolation,
    load_suite,
    suite_names,
    validate,
)
from data_contracts.frames import (
    CleanFrameBuilder,
    clean_frame,
    instruction_frame,
    pair_columns,
    preference_frame,
)
from data_contracts.tokenized import check_instruction_rows, check_preference_rows

__all__ = [
    "CleanFrameBuilder",
    "ContractRun",
    "ContractViolation",
    "check_instruction_rows",
    "check_preference_rows",
    "clean_frame",
    "load_suite",
    "preference_frame",
    "instruction_frame",
    "pair_columns",
    "suite_names",
    "validate",
]
