"""Base builds the tiny model; benchmarks are materialised; evaluate scores models by exact match."""

import json

import tasks.base
import tasks.benchmarks
import tasks.evaluate
from posttrain.artifacts import Artifact
from posttrain.config import BenchmarksConfig, EvaluateConfig, ModelConfig
from posttrain.jsonl import read_jsonl


def test_base_builds_tiny_model_with_about_100k_parameters(tmp_path):
    artifact = tasks.base.run(ModelConfig(seed=0), {}, tmp_path)
    assert 80_000 < artifact.metrics["parameters"] < 150_000
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.bin"))  # safetensors only


def test_base_is_deterministic_per_seed(tmp_path):
    from posttrain.artifacts import digest_dir

    tasks.base.run(ModelConfig(seed=3), {}, tmp_path / "a")
    tasks.base.run(ModelConfig(seed=3), {}, tmp_path / "b")
    tasks.base.run(ModelConfig(seed=4), {}, tmp_path / "c")
    assert digest_dir(tmp_path / "a") == digest_dir(tmp_path / "b") != digest_dir(tmp_path / "c")


def test_benchmarks_stage_writes_items_and_specs_per_task(tmp_path):
    artifact = tasks.benchmarks.run(BenchmarksConfig(tasks=["copy", "max"], items=20, calibration_items=7), {}, tmp_path)
    assert artifact.metrics == {"copy_items": 20, "copy_calibration_items": 7, "max_items": 20, "max_calibration_items": 7}
    items = read_jsonl(tmp_path / "copy.jsonl")
    assert [item["split"] for item in items] == ["score"] * 20 + ["calibration"] * 7
    assert len({item["prompt"] for item in items}) == 27  # calibration items are never scored items
    assert all(item["answer"] == item["prompt"].split(" ", 1)[1] for item in items)
    specs = json.loads((tmp_path / "tasks.json").read_text())
    assert specs["max"]["extract"] == "first_line" and specs["copy"]["version"] == 1


def test_evaluate_scores_exact_match_per_task(tiny_base, tiny_benchmarks, tmp_path, monkeypatch):
    """Generation is patched (correct only on copy and upper): the metrics follow the records."""
    truth = {item["prompt"]: item for name in ("copy", "reverse", "sort", "upper", "max", "add") for item in read_jsonl(tiny_benchmarks.path / f"{name}.jsonl")}
    real_generate = tasks.evaluate.generate

    def fake_generate(model, chat, records, config, sample=False, top_k=0):
        produced = real_generate(model, chat, records, config.model_copy(update={"max_new_tokens": 1}), sample, top_k)
        for record, out in zip(records, produced):
            right = truth[record["prompt"]]["task"] in ("copy", "upper")
            text = record["answer"] if right else "nope"
            if sample:
                out["samples"] = [text] * config.samples
            else:
                out["reply"] = text
        return produced

    monkeypatch.setattr(tasks.evaluate, "generate", fake_generate)
    config = EvaluateConfig(samples=4, ks=[1, 2, 4], sample_items=12)
    artifact = tasks.evaluate.run(config, {"benchmarks": tiny_benchmarks, "model": tiny_base}, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["copy", "reverse", "sort", "upper", "max", "add", "mean"]
    assert results["copy"]["exact_match"] == 1.0 and results["reverse"]["exact_match"] == 0.0
    assert abs(results["mean"]["exact_match"] - 2 / 6) < 1e-9
    assert results["mean"]["subset_items"] == 12 and results["mean"]["self_consistency_k4"] == results["mean"]["greedy_on_subset"]
    assert artifact.metrics["mean.exact_match"] == round(2 / 6, 5)
    records = read_jsonl(tmp_path / "generations.jsonl")
    assert len(records) == 6 * 8 and sum("samples" in r for r in records) == 12
    assert {"reliability.png", "logits.safetensors", "results.json"} <= {p.name for p in tmp_path.iterdir()}


def test_evaluate_generates_with_a_real_model_and_scores_a_quantized_variant_folder(tiny_base, tiny_benchmarks, tmp_path):
    quantized = tmp_path / "quant"
    (quantized / "v1").mkdir(parents=True)
    for path in tiny_base.path.iterdir():
        (quantized / "v1" / path.name).write_bytes(path.read_bytes())
    config = EvaluateConfig(max_new_tokens=4, samples=2, ks=[1, 2], sample_items=4)
    for name, model, variant in (("base", tiny_base, None), ("v1", Artifact(quantized, {"variants": ["v1"]}), "v1")):
        (tmp_path / name).mkdir()
        tasks.evaluate.run(config.model_copy(update={"variant": variant}), {"benchmarks": tiny_benchmarks, "model": model}, tmp_path / name)
    # The same weights generate the same replies.
    base, variant = (read_jsonl(tmp_path / name / "generations.jsonl") for name in ("base", "v1"))
    assert [r["reply"] for r in base] == [r["reply"] for r in variant]
