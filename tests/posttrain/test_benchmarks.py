"""Benchmark tasks load from YAML; items are fixed, split and disjoint; answers are extracted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.benchmarks import extract_answer, gsm8k, last_number, load_task, task_items
from posttrain.config import DEMO_SKILL_TASKS, BenchmarksConfig, ConfigError, load_config
from tasks.data.decontaminate import BenchmarkIndex

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO.parent / "shared" / "realdata" / "gsm8k" / "test.jsonl"
HH = REPO.parent / "shared" / "realdata" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
realdata = pytest.mark.skipif(not (GSM8K.is_file() and HH.is_file()), reason="../shared/realdata is not here")


def test_every_shipped_task_loads_and_the_demo_config_lists_the_skills():
    for path in sorted((REPO / "configs" / "benchmarks").glob("*.yaml")):
        task = load_task(path.stem)
        assert task.name == path.stem and task.version >= 1 and task.metrics
    assert load_config(REPO / "configs" / "demo.yaml").benchmarks.tasks == list(DEMO_SKILL_TASKS)


def test_skill_items_are_fixed_split_and_disjoint():
    task = load_task("reverse")
    first, again = task_items(task, calibration=10, items=30), task_items(task, calibration=10, items=30)
    assert first == again
    scored = [item for item in first if item["split"] == "score"]
    calibration = [item for item in first if item["split"] == "calibration"]
    assert len(scored) == 30 and len(calibration) == 10
    assert not {item["prompt"] for item in scored} & {item["prompt"] for item in calibration}
    assert all(item["answer"] == item["prompt"].removeprefix("reverse ")[::-1] for item in first)
    # More calibration items never change the scored ones.
    assert [i for i in task_items(task, calibration=20, items=30) if i["split"] == "score"] == scored


def test_bad_task_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: other\nsource: {generator: skills, skill: copy}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: name: 'other' must be the file's name \('mine'\)"):
        load_task(str(bad))
    bad.write_text("name: mine\nsource: {generator: skills, skill: copy}\nextract: telepathy\n")
    with pytest.raises(ConfigError, match=r"extract: 'telepathy' is not an extractor"):
        load_task(str(bad))
    bad.write_text("name: mine\nsource: {generator: skills, skill: juggle}\n")
    with pytest.raises(ConfigError, match=r"source.skill: 'juggle' is not a skill"):
        load_task(str(bad))
    with pytest.raises(ConfigError, match=r"benchmarks.tasks: 'nope': no task file .*nope.yaml \(shipped: .*gsm8k"):
        load_task("nope")


def test_a_task_file_and_its_data_file_are_outside_inputs(tmp_path):
    inputs = BenchmarksConfig(tasks=["copy", "gsm8k"]).outside_inputs()
    assert inputs["benchmarks.tasks[0]"].name.endswith("configs/benchmarks/copy.yaml")
    assert inputs["benchmarks.tasks[1].source"].name == "../shared/realdata/gsm8k/test.jsonl"
    assert "benchmarks.tasks[0].source" not in inputs  # a generated task reads no file


def test_extractors():
    assert gsm8k("She has 3 + 4 = 7 apples.\n#### 7") == "7"
    assert gsm8k("so the total is 1,250 dollars") == "1250"  # no marker: the last number
    assert gsm8k("#### 18.0") == "18" and gsm8k("no number") == ""
    assert last_number("from 3 to -12.5.") == "-12.5"
    task = load_task("copy").model_copy(update={"extract": {"regex": r"answer: (\w+)"}})
    assert extract_answer(task, "the answer: xyz!") == "xyz" and extract_answer(task, "nothing") == ""


@realdata
def test_gsm8k_items_and_answer_extraction_on_the_real_file():
    task = load_task("gsm8k")
    items = task_items(task, calibration=20)
    assert [item["split"] for item in items].count("score") == 200
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    # Every reference in the file is the number after "####" in its worked solution.
    for row in rows:
        assert gsm8k(row["answer"]) == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    by_question = {row["question"]: row for row in rows}
    for item in items[:50]:
        question = item["prompt"].split("\nSolve it step by step", 1)[0]
        assert item["answer"] == gsm8k(by_question[question]["answer"])
        # A model that writes the worked solution gets it right; one that writes the number alone too.
        assert extract_answer(task, by_question[question]["answer"]) == item["answer"]
        assert extract_answer(task, f"The answer is {item['answer']}.") == item["answer"]
    assert task_items(task, calibration=20) == items  # a fixed sample whatever is asked twice


@realdata
def test_the_hh_slice_is_fixed_and_decontaminates_training_pairs():
    task = load_task("hh-preference")
    items = task_items(task)
    assert len(items) == 200 and all(item["chosen"] != item["rejected"] for item in items)
    assert any("messages" in item for item in items)  # multi-turn prompts keep their turns
    index = BenchmarkIndex({"hh-preference": [item["prompt"] for item in items]}, ngram=13, min_words=8)
    held_out = items[0]
    assert index.matches({"prompt": held_out["prompt"], "chosen": "x", "rejected": "y"}, "preference") == ["hh-preference"]
