"""The report's comparisons, the candidate, the renderers, and the saved token logits behind calibration."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.numpy import load_file

import tasks.evaluate
from posttrain import metrics, report
from posttrain.config import EvaluateConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_jsonl
from posttrain.models import load_causal_lm, load_tokenizer

TASKS = {"sort": {"kind": "generation", "tags": []}, "add": {"kind": "generation", "tags": []}, "gsm8k": {"kind": "generation", "tags": ["general"]}}


def results_of(scores: dict[str, float]) -> dict:
    rows = {task: {"exact_match": value} for task, value in scores.items()}
    rows["mean"] = {"exact_match": sum(scores.values()) / len(scores)}
    return rows


def generations(rewards: dict[str, float]) -> list[dict]:
    return [{"id": item, "task": item.split("-")[0], "split": "score", "reward": value} for item, value in rewards.items()]


def test_join_adds_win_rates_alignment_tax_and_forgetting():
    per_model = {
        "base": results_of({"sort": 0.1, "add": 0.1, "gsm8k": 0.5}),
        "sft": results_of({"sort": 0.6, "add": 0.2, "gsm8k": 0.4}),
        "align-dpo": results_of({"sort": 0.5, "add": 0.4, "gsm8k": 0.4}),
    }
    rewards = {
        "sft": generations({"sort-0": 0.0, "sort-1": 0.0, "add-0": 0.0}),
        "align-dpo": generations({"sort-0": 1.0, "sort-1": 0.0, "add-0": -1.0}),
        "base": generations({"sort-0": -1.0, "sort-1": -1.0, "add-0": -1.0}),
    }
    joined, notes = report.join(per_model, rewards, TASKS, aligned=["align-dpo"], target_tasks=["add"], base_is_random=False)
    dpo = joined["align-dpo"]
    assert dpo["sort"]["win_rate_vs_sft"] == pytest.approx(0.75) and dpo["add"]["win_rate_vs_sft"] == 0.0
    assert dpo["mean"]["win_rate_vs_sft"] == pytest.approx(1.5 / 3)
    assert dpo["mean"]["targeted_gain"] == pytest.approx(0.2)  # add: 0.4 vs 0.2
    assert dpo["mean"]["alignment_tax"] == pytest.approx(0.05)  # sort -0.1, gsm8k 0: mean drop 0.05
    assert joined["sft"]["mean"]["forgetting"] == pytest.approx(0.1)  # gsm8k (general) 0.5 -> 0.4
    assert joined["sft"]["mean"]["win_rate_vs_sft"] == 0.5
    assert notes == []
    _, notes = report.join(per_model, rewards, TASKS, aligned=["align-dpo"], target_tasks=None, base_is_random=True)
    assert any("randomly initialised" in note for note in notes) and any("target_skills is not set" in note for note in notes)


def test_candidate_is_the_best_eligible_model_or_the_named_one():
    results = {name: results_of({"sort": score}) for name, score in (("base", 0.9), ("sft", 0.5), ("align-dpo", 0.7), ("student", 0.7), ("quantize-nf4", 0.95))}
    assert report.choose_candidate(results, "best", None, "exact_match") == "align-dpo"  # not base, not a variant; first on a tie
    assert report.choose_candidate(results, "best", ["sft", "student"], "exact_match") == "student"
    assert report.choose_candidate(results, "sft", None, "exact_match") == "sft"
    with pytest.raises(ValueError, match="not a model of this run"):
        report.choose_candidate(results, "gpt-9", None, "exact_match")


def test_one_renderer_for_terminal_markdown_and_mlflow():
    from rich.console import Console

    results = {name: results_of({"copy": 1.0, "reverse": 0.5, "sort": 0.25, "upper": 1.0, "max": 0.9, "add": 0.1}) for name in ("base", "sft", "align-dpo", "student", "quantize-nf4", "quantize-int8")}
    for name in results:
        results[name]["mean"].update({"ece": 0.05, "ece_scaled": 0.02, "self_consistency_k16": 0.8, "best_of_n_k16": 0.85, "completion_loss": 0.1, "win_rate_vs_sft": 0.5})
    console = Console(width=100, record=True)
    console.print(report.terminal_table(results))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100 and not any("…" in line for line in lines)  # readable in 100 columns
    assert any(line.startswith("│align-dpo") or "align-dpo" in line for line in lines)
    markdown = report.markdown_table(results)
    assert "| sft | 100.0 | 50.0 | 25.0 | 100.0 | 90.0 | 10.0 |" in markdown and "maj@16" in markdown
    table = report.mlflow_table(results)
    assert set(table) == {"model", "task", "metric", "value"} and len(table["model"]) == 6 * (6 + 7)


def test_saved_token_logits_reproduce_the_models_own_reply_probability(tiny_base, tiny_benchmarks, tmp_path):
    config = EvaluateConfig(max_new_tokens=6, samples=2, ks=[1, 2], sample_items=4, top_logits=200)  # k >= vocab: exact
    tasks.evaluate.run(config, {"benchmarks": tiny_benchmarks, "model": tiny_base}, tmp_path)
    records = [r for r in read_jsonl(tmp_path / "generations.jsonl") if r["task"] == "copy"][:3]
    logits = load_file(tmp_path / "logits.safetensors")
    model, tokenizer = load_causal_lm(tiny_base.path), load_tokenizer(tiny_base.path)
    chat = ChatFormat(tokenizer)
    for record in records:
        prompt = chat.prompt_ids([record])[0]
        reply = tokenizer(record["reply"], add_special_tokens=False)["input_ids"]
        saved = logits[record["id"]]
        reply = reply[: saved.shape[0]] + ([tokenizer.eos_token_id] if saved.shape[0] > len(reply) else [])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([prompt + reply])).logits[0].float(), -1)
        expected = sum(log_probs[len(prompt) - 1 + t, token].item() for t, token in enumerate(reply))
        assert metrics.sequence_logprob(saved) == pytest.approx(expected, abs=1e-3)
        assert math.isfinite(expected)
