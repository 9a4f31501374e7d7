"""Data contracts: Great Expectations suites, one JSON file per edge of the pipeline.

    instruction_clean.json      data -> sft/reward/distill   <data>/instruction/{train,eval}.jsonl
    preference_clean.json       data -> reward/align[dpo]    <data>/preference/{train,eval}.jsonl
    prompt_clean.json           data -> align[grpo|ppo]      <data>/prompt/{train,eval}.jsonl
    instruction_tokenized.json  data -> sft                  instruction rows as the trainer encodes them

`frames` turns records into the frame a suite expects (computed columns included); `check.validate`
runs the suite and raises `ContractViolation` on a failed critical expectation. Suites are data: to
tighten a contract, edit its JSON (every expectation needs `meta.severity`: critical | warning).
"""

from data_contracts.check import ContractViolation, load_suite, suite_names, validate
from data_contracts.frames import clean_frame, tokenized_frame

__all__ = ["ContractViolation", "clean_frame", "load_suite", "suite_names", "tokenized_frame", "validate"]
