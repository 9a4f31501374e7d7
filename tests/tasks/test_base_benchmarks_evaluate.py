"""Base builds the tiny model; benchmarks are materialised; evaluate scores models by exact match."""

import json

import tasks.base
import tasks.benchmarks
import tasks.evaluate
from posttrain.artifacts import Artifact
from posttrain.config import BenchmarkConfig, EvaluateConfig, ModelConfig
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


def test_benchmarks_stage_writes_unique_items_per_skill(tmp_path):
    artifact = tasks.benchmarks.run({"skills": BenchmarkConfig(per_skill=20, seed=5)}, {}, tmp_path)
    items = read_jsonl(tmp_path / "skills.jsonl")
    assert artifact.metrics == {"skills_items": 120, "skills_skills": 6}
    assert len({item["prompt"] for item in items}) == 120



def test_evaluate_scores_exact_match_per_skill(tiny_base, tiny_benchmarks, tmp_path, monkeypatch):
    items = read_jsonl(tiny_benchmarks.path / "skills.jsonl")
    # Patch generation: answer correctly for 'copy' and 'upper' only.
    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size):
        truth = {item["prompt"]: item for item in items}
        return [truth[p]["answer"] if truth[p]["skill"] in ("copy", "upper") else "nope" for p in prompts]

    monkeypatch.setattr(tasks.evaluate, "generate_answers", fake_generate)
    inputs = {"benchmarks": tiny_benchmarks, "base": tiny_base}
    artifact = tasks.evaluate.run(EvaluateConfig(), inputs, tmp_path)
    assert artifact.metrics["base.skills.copy"] == 1.0
    assert artifact.metrics["base.skills.reverse"] == 0.0
    assert abs(artifact.metrics["base.skills.mean"] - 2 / 6) < 1e-4
    table = json.loads((tmp_path / "results.json").read_text())
    assert list(table) == ["base"]
    assert "| base |" in (tmp_path / "results.md").read_text()


def test_evaluate_generates_with_real_model_and_expands_variants(tiny_base, tiny_benchmarks, tmp_path):
    quantized = tmp_path / "quant"
    (quantized / "v1").mkdir(parents=True)
    for path in tiny_base.path.iterdir():
        (quantized / "v1" / path.name).write_bytes(path.read_bytes())
    inputs = {
        "benchmarks": tiny_benchmarks,
        "base": tiny_base,
        "quantize": Artifact(quantized, {"variants": ["v1"]}),
    }
    (tmp_path / "out").mkdir()
    artifact = tasks.evaluate.run(EvaluateConfig(max_new_tokens=4, limit_per_skill=2), inputs, tmp_path / "out")
    assert artifact.manifest["models"] == ["base", "quantize-v1"]
    # An untrained model scores (almost surely) zero; the same weights score the same.
    assert artifact.metrics["base.skills.mean"] == artifact.metrics["quantize-v1.skills.mean"]
    samples = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert len(samples["base"]) == 12
