"""The Great Expectations suites in data_contracts/, run directly on small frames."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import data_contracts
from data_contracts import (
    ContractRun,
    ContractViolation,
    check,
    clean_frame,
    instruction_frame,
    load_suite,
    pair_columns,
    preference_frame,
    suite_names,
    validate,
)
from posttrain.formatting import IGNORE_INDEX, ChatFormat, encode_example
from posttrain.models import load_tokenizer

INSTRUCTION = ["prompt", "response"]
PREFERENCE = ["prompt", "chosen", "rejected"]
SUITES = [
    "distill_tokenized",
    "dpo_tokenized",
    "instruction_clean",
    "preference_clean",
    "prompt_clean",
    "reward_tokenized",
    "sft_tokenized",
]


def instruction_splits() -> dict[str, list[dict]]:
    return {
        "train": [{"prompt": "copy abc", "response": "abc", "skill": "copy"}, {"prompt": "reverse abc", "response": "cba"}],
        "eval": [{"prompt": "upper abc", "response": "ABC"}],
    }


def test_every_suite_has_severities_and_builds_in_gx():
    assert suite_names() == SUITES
    gx = check.import_gx()
    for name in suite_names():
        spec = load_suite(name)
        assert {e["meta"]["severity"] for e in spec["expectations"]} <= {"critical", "warning"}
        assert spec["meta"]["edge"].startswith("data")
        suite = check._build_suite(gx, spec, check.SUITES_DIR / f"{name}.json")
        assert len(suite.expectations) == len(spec["expectations"])  # nothing silently dropped


def test_clean_frame_columns_and_summary_counts(tmp_path):
    frame = clean_frame(instruction_splits(), INSTRUCTION, INSTRUCTION)
    assert frame["prompt_chars"].tolist() == [8, 11, 9]
    assert frame["text_chars"].tolist() == [11, 14, 12]
    assert frame["split"].tolist() == ["train", "train", "eval"]
    assert frame["dedup_key"].nunique() == 3
    summary = validate(frame, "instruction_clean", tmp_path)
    assert summary["rows"] == 3
    assert summary["evaluated"] == summary["passed"] == len(load_suite("instruction_clean")["expectations"])
    assert summary["failed"] == {} and summary["violation"] is None
    written = json.loads((tmp_path / "contracts" / "instruction_clean.json").read_text())
    assert written["success"] is True and len(written["results"]) == summary["evaluated"]


def test_dedup_key_collapses_whitespace_including_newlines():
    splits = {"train": [{"prompt": "a", "response": "one\n\ntwo"}, {"prompt": "a", "response": "one two "}]}
    frame = clean_frame(splits, INSTRUCTION, ["response"])
    assert frame["dedup_key"].nunique() == 1


def test_chosen_equal_to_rejected_is_a_one_line_violation(tmp_path):
    splits = {
        "train": [{"prompt": "upper ab", "chosen": "AB", "rejected": "AC"}, {"prompt": "upper cd", "chosen": "CD", "rejected": "CD"}],
        "eval": [{"prompt": "upper ef", "chosen": "EF", "rejected": "FF"}],
    }
    frame = clean_frame(splits, PREFERENCE, ["prompt", "chosen"])
    with pytest.raises(ContractViolation) as error:
        validate(frame, "preference_clean", tmp_path)
    assert str(error.value) == "data contract preference_clean: expect_column_values_to_be_in_set(chosen_equals_rejected) failed on 1 of 3 rows"


def test_missing_and_empty_fields_fail(tmp_path):
    splits = {"train": [{"prompt": "copy a", "response": "a"}, {"prompt": "copy b"}, {"prompt": "copy c", "response": ""}]}
    frame = clean_frame(splits, INSTRUCTION, INSTRUCTION)
    assert frame["response_chars"].isna().tolist() == [False, True, False]
    with pytest.raises(ContractViolation, match=r"^data contract instruction_clean: expect_column_values_to_not_be_null\(response_chars\) failed on 1 of 3 rows \(\+3 more critical"):
        validate(frame, "instruction_clean", tmp_path)  # the 3rd more: no eval split


def test_duplicate_key_and_several_failures_name_the_first_and_count_the_rest(tmp_path):
    splits = instruction_splits()
    splits["eval"].append(dict(splits["train"][0]))  # a train row leaked into eval
    splits["train"].append({"prompt": "copy \x07bell", "response": "bell"})
    frame = clean_frame(splits, INSTRUCTION, INSTRUCTION)
    with pytest.raises(ContractViolation) as error:
        validate(frame, "instruction_clean", tmp_path)
    message = str(error.value)
    assert message.startswith("data contract instruction_clean: expect_column_values_to_be_in_set(prompt_control_chars) failed on 1 of 5 rows (+1 more critical")
    results = json.loads((tmp_path / "contracts" / "instruction_clean.json").read_text())["results"]
    failed = {r["expectation_config"]["kwargs"].get("column") for r in results if not r["success"]}
    assert failed == {"prompt_control_chars", "dedup_key"}


def test_warnings_do_not_raise(tmp_path):
    splits = {"train": [{"prompt": "copy abc", "response": "abc "}], "eval": [{"prompt": "copy d", "response": "d"}]}  # a trailing space
    summary = validate(clean_frame(splits, INSTRUCTION, INSTRUCTION), "instruction_clean", tmp_path)
    assert summary["critical_failed"] == 0 and summary["warnings_failed"] == 1
    assert summary["failed"]["expect_column_values_to_be_in_set(response_padded)"]["unexpected"] == 1
    assert summary["passed"] == summary["evaluated"] - 1


def test_an_empty_split_is_critical(tmp_path):
    splits = {"train": [{"prompt": "copy abc", "response": "abc"}, {"prompt": "copy d", "response": "d"}]}  # no eval rows
    with pytest.raises(ContractViolation, match=r"^data contract instruction_clean: expect_column_distinct_values_to_contain_set\(split\) failed"):
        validate(clean_frame(splits, INSTRUCTION, INSTRUCTION), "instruction_clean", tmp_path)


def encoded_rows(prompt_tokens: list[int], completion_tokens: list[int], max_length: int) -> list[dict]:
    """Encodings of single-turn rows with the given token counts, as ChatFormat cuts them."""
    rows = []
    for prompt, completion in zip(prompt_tokens, completion_tokens):
        labels = [IGNORE_INDEX] * prompt + [7] * completion
        rows.append({"input_ids": [5] * len(labels[:max_length]), "labels": labels[:max_length], "truncated": prompt + completion > max_length})
    return rows


def test_instruction_frame_matches_encode_example(tiny_base):
    tokenizer = load_tokenizer(tiny_base.path)
    records = [{"prompt": "copy abc", "response": "abc"}, {"prompt": "copy abcdefgh", "response": "abcdefgh"}, {"prompt": "x" * 30, "response": "y"}]
    for max_length in (12, 24, 96):
        frame = instruction_frame(ChatFormat(tokenizer).encode_rows(records, max_length))
        for record, (_, row) in zip(records, frame.iterrows()):
            encoded = encode_example(tokenizer, record["prompt"], record["response"], max_length)
            assert row["total_tokens"] == len(encoded["input_ids"])
            assert row["trainable_tokens"] == sum(label != -100 for label in encoded["labels"])
            assert row["truncated"] == encoded["truncated"]
    # Character tokens: "Q: copy abc\nA:" is 14, " abc" + EOS 5.
    frame = instruction_frame(ChatFormat(tokenizer).encode_rows(records, 1000))
    assert frame["trainable_tokens"].tolist() == [5, 10, 3] and (frame["total_tokens"] - frame["trainable_tokens"]).tolist() == [14, 19, 36]
    pairs = [{"prompt": "upper ab", "chosen": "AB", "rejected": "AC"}]
    # " AB" + EOS vs " AC" + EOS share " A": a common prefix of 2 ids.
    assert [column.tolist() for column in pair_columns(ChatFormat(tokenizer).split_replies(pairs))] == [[14], [4], [4], [2]]


def test_tokenized_suite_catches_truncation_and_zero_trainable_rows(tmp_path):
    frame = instruction_frame(encoded_rows([14, 19] * 50, [5, 10] * 50, max_length=24))  # every second row (19 + 10) is cut at 24
    assert frame["truncated"].sum() == 50
    with pytest.raises(ContractViolation, match=r"^data contract sft_tokenized: expect_column_values_to_be_in_set\(truncated\) failed on 50 of 100 rows$"):
        validate(frame, "sft_tokenized", tmp_path)
    # One truncated row in 100 is within the 1 % limit: only the any-truncation warning fails.
    summary = validate(instruction_frame(encoded_rows([14] * 100, [5] * 99 + [20], max_length=24)), "sft_tokenized", tmp_path)
    assert summary["critical_failed"] == 0 and summary["failed"]["expect_column_values_to_be_in_set(truncated)"]["severity"] == "warning"
    # A prompt as long as max_length leaves nothing to train on.
    frame = instruction_frame(encoded_rows([14, 24], [5, 5], max_length=24))
    assert frame["trainable_tokens"].tolist() == [5, 0]
    with pytest.raises(ContractViolation, match=r"distill_tokenized: expect_column_values_to_be_between\(trainable_tokens\) failed on 1 of 2 rows"):
        validate(frame, "distill_tokenized", tmp_path)


def test_preference_frame_truncation_and_identical_pairs(tmp_path):
    # prompt, chosen, rejected token counts (+EOS) and the common prefix of the two completions
    p, c, r, common = np.array([10, 10, 10]), np.array([5, 30, 6]), np.array([6, 31, 6]), np.array([2, 25, 6])
    reward = preference_frame(p, c, r, common, max_length=32, overlong="dropped")
    dpo = preference_frame(p, c, r, common, max_length=32, overlong="truncated")
    assert reward["truncated"].tolist() == dpo["truncated"].tolist() == [False, True, False]
    # The third pair has identical completion ids; the second differs only after token 25 of its
    # completions, which DPO at 32 tokens (22 completion tokens) never sees.
    assert reward["identical"].tolist() == [False, False, True]
    assert dpo["identical"].tolist() == [False, True, True]
    assert dpo["chosen_trainable"].tolist() == [5, 22, 6]
    with pytest.raises(ContractViolation, match=r"^data contract dpo_tokenized: expect_column_values_to_be_in_set\(identical\) failed on 2 of 3 rows"):
        validate(dpo, "dpo_tokenized", tmp_path)
    ok = preference_frame(np.full(10, 10), np.full(10, 5), np.full(10, 6), np.full(10, 2), max_length=32, overlong="dropped")
    assert validate(ok, "reward_tokenized", tmp_path)["critical_failed"] == 0


def test_contract_run_builds_reproducible_data_docs(tmp_path):
    pages = []
    for attempt in ("first", "second"):
        contracts = ContractRun(tmp_path / attempt, docs_dir=tmp_path / attempt / "data_docs")
        contracts.validate(clean_frame(instruction_splits(), INSTRUCTION, INSTRUCTION), "instruction_clean")
        bad = clean_frame({"train": [{"prompt": "a", "chosen": "b", "rejected": "b"}]}, PREFERENCE, PREFERENCE)
        summary = contracts.validate(bad, "preference_clean")  # does not raise: the run decides when
        assert summary["violation"].startswith("data contract preference_clean: expect_column_values_to_be_in_set(chosen_equals_rejected)")
        index = contracts.build_docs()
        assert index == tmp_path / attempt / "data_docs" / "index.html"
        pages.append({path.relative_to(tmp_path / attempt).as_posix(): path.read_bytes() for path in (tmp_path / attempt).rglob("*.html")})
        with pytest.raises(ContractViolation, match="preference_clean"):
            contracts.raise_first_violation()
    assert pages[0] == pages[1]  # no timestamps or random ids
    assert {"data_docs/index.html"} < set(pages[0]) and any("validations/preference_clean" in name for name in pages[0])
    assert not (tmp_path / "first" / "data_docs" / "static" / "images" / "glossary_scroller.gif").exists()


def test_a_typo_in_a_suite_is_an_error_not_a_dropped_expectation(tmp_path, monkeypatch):
    spec = load_suite("sft_tokenized")
    spec["expectations"][1]["type"] = "expect_column_values_to_bee_between"
    (tmp_path / "broken.json").write_text(json.dumps(spec))
    monkeypatch.setattr(check, "SUITES_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"broken.json expectation 1 \(expect_column_values_to_bee_between\): .*not found"):
        validate(pd.DataFrame({"trainable_tokens": [1]}), "broken", tmp_path)
    spec["expectations"][1]["type"] = "expect_column_values_to_be_between"
    spec["expectations"][1]["meta"] = {}
    (tmp_path / "broken.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"expectation 1: meta.severity must be one of"):
        validate(pd.DataFrame({"trainable_tokens": [1]}), "broken", tmp_path)


def test_package_exports():
    assert data_contracts.validate is check.validate
    assert issubclass(ContractViolation, ValueError)
