"""The Great Expectations suites in data_contracts/, run directly on small frames."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import data_contracts
from data_contracts import ContractViolation, clean_frame, load_suite, suite_names, tokenized_frame, validate
from data_contracts import check
from posttrain.models import load_tokenizer

INSTRUCTION = ["prompt", "response"]
PREFERENCE = ["prompt", "chosen", "rejected"]


def instruction_splits() -> dict[str, list[dict]]:
    return {
        "train": [{"prompt": "copy abc", "response": "abc", "skill": "copy"}, {"prompt": "reverse abc", "response": "cba"}],
        "eval": [{"prompt": "upper abc", "response": "ABC"}],
    }


def test_every_suite_has_severities_and_builds_in_gx():
    assert suite_names() == ["instruction_clean", "instruction_tokenized", "preference_clean", "prompt_clean"]
    gx = check._import_gx()
    for name in suite_names():
        spec = load_suite(name)
        assert {e["meta"]["severity"] for e in spec["expectations"]} <= {"critical", "warning"}
        suite = check._build_suite(gx, spec, check.SUITES_DIR / f"{name}.json")
        assert len(suite.expectations) == len(spec["expectations"])  # nothing silently dropped


def test_clean_frame_passes_and_summary_counts(tmp_path):
    frame = clean_frame(instruction_splits(), INSTRUCTION, INSTRUCTION)
    summary = validate(frame, "instruction_clean", tmp_path)
    assert summary["rows"] == 3
    assert summary["evaluated"] == summary["passed"] == len(load_suite("instruction_clean")["expectations"])
    assert summary["failed"] == {}
    written = json.loads((tmp_path / "contracts" / "instruction_clean.json").read_text())
    assert written["success"] is True and len(written["results"]) == summary["evaluated"]


def test_chosen_equal_to_rejected_is_a_one_line_violation(tmp_path):
    splits = {
        "train": [{"prompt": "upper ab", "chosen": "AB", "rejected": "AC"}, {"prompt": "upper cd", "chosen": "CD", "rejected": "CD"}],
        "eval": [{"prompt": "upper ef", "chosen": "EF", "rejected": "FF"}],
    }
    frame = clean_frame(splits, PREFERENCE, ["prompt", "chosen"])
    with pytest.raises(ContractViolation) as error:
        validate(frame, "preference_clean", tmp_path)
    assert str(error.value) == "data contract preference_clean: expect_column_values_to_be_in_set(chosen_equals_rejected) failed on 1 of 3 rows"


def test_empty_response_in_a_plain_frame_fails(tmp_path):
    frame = pd.DataFrame(
        {
            "prompt": ["copy a", "copy b", "copy c"],
            "response": ["a", "", "c"],
            "split": ["train", "train", "eval"],
            "dedup_key": ["1", "2", "3"],
            "text_chars": [7, 6, 7],
        }
    )
    with pytest.raises(ContractViolation, match=r"^data contract instruction_clean: expect_column_value_lengths_to_be_between\(response\) failed on 1 of 3 rows$"):
        validate(frame, "instruction_clean", tmp_path)


def test_duplicate_key_and_several_failures_name_the_first_and_count_the_rest(tmp_path):
    splits = instruction_splits()
    splits["eval"].append(dict(splits["train"][0]))  # a train row leaked into eval
    splits["train"].append({"prompt": "copy \x07bell", "response": "bell"})
    frame = clean_frame(splits, INSTRUCTION, INSTRUCTION)
    with pytest.raises(ContractViolation) as error:
        validate(frame, "instruction_clean", tmp_path)
    message = str(error.value)
    assert message.startswith("data contract instruction_clean: expect_column_values_to_not_match_regex(prompt) failed on 1 of 5 rows (+1 more critical")
    results = json.loads((tmp_path / "contracts" / "instruction_clean.json").read_text())["results"]
    failed = {r["expectation_config"]["kwargs"].get("column") for r in results if not r["success"]}
    assert failed == {"prompt", "dedup_key"}


def test_warnings_do_not_raise(tmp_path):
    splits = {"train": [{"prompt": "copy abc", "response": "abc "}]}  # no eval split, trailing space
    summary = validate(clean_frame(splits, INSTRUCTION, INSTRUCTION), "instruction_clean", tmp_path)
    assert summary["critical_failed"] == 0 and summary["warnings_failed"] == 2
    assert summary["failed"]["expect_column_values_to_not_match_regex(response)"]["unexpected"] == 1
    assert summary["passed"] == summary["evaluated"] - 2


def test_tokenized_suite_catches_truncation(tmp_path, tiny_base):
    tokenizer = load_tokenizer(tiny_base.path)
    records = [{"prompt": "copy abc", "response": "abc"}, {"prompt": "copy abcdefgh", "response": "abcdefgh"}]
    frame = tokenized_frame(records, tokenizer, max_length=24)
    # Character tokens: "Q: copy abc\nA:" is 14, " abc" + EOS 5; the second row (19 + 10) is cut at 24.
    assert frame["total_tokens"].tolist() == [19, 24]
    assert frame["trainable_tokens"].tolist() == [5, 5]
    assert frame["truncated"].tolist() == [False, True]
    with pytest.raises(ContractViolation, match=r"instruction_tokenized: expect_column_values_to_be_in_set\(truncated\) failed on 1 of 2 rows"):
        validate(frame, "instruction_tokenized", tmp_path)
    summary = validate(tokenized_frame(records, tokenizer, max_length=96), "instruction_tokenized", tmp_path)
    assert summary["passed"] == summary["evaluated"] == 4


def test_a_typo_in_a_suite_is_an_error_not_a_dropped_expectation(tmp_path, monkeypatch):
    spec = load_suite("instruction_tokenized")
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
