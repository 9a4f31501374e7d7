"""The distill stage: a smaller student learns from the teacher's pre-computed top-k logits.

A randomly initialised tiny model with tied embeddings predicts its own input token, so two random
models agree everywhere; the teacher here is therefore tiny_base after a short plain-SFT loop
(~3 s), which gives the student something specific to learn.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain import formatting
from posttrain.artifacts import Artifact
from posttrain.config import DistillConfig, StudentConfig
from posttrain.jsonl import read_jsonl, write_jsonl
from posttrain.models import build_char_tokenizer, count_parameters, load_causal_lm, load_tokenizer, save_pretrained
from tasks import distill

STEPS, BATCH = 40, 16


@pytest.fixture(scope="module")
def teacher(tiny_base, tiny_data, tmp_path_factory) -> Artifact:
    """tiny_base after 150 plain SFT steps: eval loss ~2.2 vs ~4.6 at random init."""
    model = load_causal_lm(tiny_base.path)
    tokenizer = load_tokenizer(tiny_base.path)
    rows = read_jsonl(tiny_data.path / "instruction" / "train.jsonl")
    examples = [formatting.encode_example(tokenizer, r["prompt"], r["response"], 96) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        picked = torch.randint(len(examples), (16,), generator=generator).tolist()
        batch = formatting.pad_batch([examples[i] for i in picked], tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("teacher")
    save_pretrained(model, tokenizer, folder)
    return Artifact(folder, {"digest": "trained-teacher", "metrics": {}})


def _distill(teacher, data, out, **overrides) -> Artifact:
    config = DistillConfig(**{"max_steps": STEPS, "batch_size": BATCH, "warmup_steps": 5, **overrides})
    out.mkdir()
    return distill.run(config, {"teacher": teacher, "data": data}, out)


def _losses(folder) -> list[float]:
    return [point["loss"] for point in json.loads((folder / "loss_history.json").read_text())]


def test_distill_saves_a_smaller_student_that_learns(teacher, tiny_data, tmp_path):
    artifact = _distill(teacher, tiny_data, tmp_path / "out", alpha=0.5)
    m = artifact.metrics

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert count_parameters(student) == m["student_parameters"] < m["teacher_parameters"]
    assert m["size_ratio"] < 0.5 and m["student_bytes"] < m["teacher_bytes"]
    assert student.config.hidden_size == StudentConfig().hidden_size
    # Same tokenizer and vocabulary as the teacher, so their logits line up.
    assert load_tokenizer(tmp_path / "out").get_vocab() == load_tokenizer(teacher.path).get_vocab()
    assert student.config.vocab_size == load_causal_lm(teacher.path).config.vocab_size

    losses = _losses(tmp_path / "out")
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert m["student_eval_loss"] < m["student_eval_loss_before"] - 0.3
    assert m["teacher_eval_loss"] < 3.0  # the fixture teacher really was trained

    # The teacher ran once, over exactly the rows the schedule reaches, before training started.
    assert m["teacher_rows"] == min(STEPS * BATCH, m["train_rows"])
    # Only the rows the schedule can reach are encoded (in chunks of at least 256).
    assert m["train_rows_available"] == 540 and m["train_rows"] <= max(STEPS * BATCH, 256)
    assert m["teacher_precompute_seconds"] > 0 and m["train_seconds"] > 0
    assert m["tokens_per_second"] > 0 and m["train_steps"] == STEPS
    assert 0 < m["teacher_topk_mass"] <= 1.0
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in m.values())


def test_kd_term_alone_pulls_the_student_toward_the_teacher(teacher, tiny_data, tmp_path):
    # alpha=0: no hard-label term at all, so any movement toward the teacher comes from its logits.
    m = _distill(teacher, tiny_data, tmp_path / "kd", alpha=0.0).metrics
    assert m["agreement"] > m["agreement_before"] + 0.2
    losses = _losses(tmp_path / "kd")
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])


def test_alpha_one_is_the_plain_sft_control(teacher, tiny_data, tmp_path):
    m = _distill(teacher, tiny_data, tmp_path / "sft", alpha=1.0, max_steps=5).metrics
    assert "teacher_rows" not in m  # the teacher is not run for training at all
    assert m["teacher_precompute_seconds"] < 0.01


def test_precomputed_topk_matches_the_teacher_logits(teacher, tiny_data):
    model = load_causal_lm(teacher.path)
    tokenizer = load_tokenizer(teacher.path)
    rows = read_jsonl(tiny_data.path / "instruction" / "eval.jsonl")[:3]
    examples = distill.trainable(formatting.ChatFormat(tokenizer).encode_rows(rows, 96))
    values, ids, mass = distill.precompute_teacher_topk(model, examples, 4, 2, tokenizer.pad_token_id, "cpu")

    assert values[0].dtype == torch.float16 and ids[0].dtype == torch.int16
    for example, row_values, row_ids in zip(examples, values, ids):
        completion_tokens = sum(label != formatting.IGNORE_INDEX for label in example["labels"])
        assert row_values.shape == row_ids.shape == (completion_tokens, 4)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        positions = torch.tensor(example["labels"][1:]) != formatting.IGNORE_INDEX
        expected = logits[positions].topk(4, dim=-1)
        assert torch.equal(row_ids.long(), expected.indices)
        assert torch.allclose(row_values.float(), expected.values, atol=1e-2)
    assert 0 < mass <= 1


def test_kd_loss_is_zero_only_when_the_student_matches():
    torch.manual_seed(0)
    teacher_logits = torch.randn(5, 30)
    top = teacher_logits.topk(8, dim=-1)
    assert distill.kd_loss(teacher_logits, top.values, top.indices, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    # Shifting all logits of a position leaves the distribution, hence the loss, unchanged.
    shifted = teacher_logits + torch.randn(5, 1)
    assert distill.kd_loss(shifted, top.values, top.indices, 2.0).item() == pytest.approx(0.0, abs=1e-5)
    assert distill.kd_loss(torch.randn(5, 30), top.values, top.indices, 2.0).item() > 0.05


def test_non_llama_teacher_gets_a_student_of_its_own_class(tiny_data, tmp_path):
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer) + 4,  # padded vocabulary, as real checkpoints have
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    save_pretrained(Qwen2ForCausalLM(config), tokenizer, tmp_path / "qwen")
    m = _distill(Artifact(tmp_path / "qwen"), tiny_data, tmp_path / "out", max_steps=3).metrics

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert student.config.model_type == "qwen2"
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (32, 2)
    assert student.config.vocab_size == config.vocab_size
    assert m["student_parameters"] < m["teacher_parameters"] and math.isfinite(m["student_eval_loss"])


def test_bad_inputs_fail_with_one_line_errors(teacher, tiny_data, tmp_path):
    bad = tmp_path / "bad"
    rows = read_jsonl(tiny_data.path / "instruction" / "train.jsonl")[:5]
    rows[2] = {"prompt": "copy abc"}
    write_jsonl(bad / "instruction" / "train.jsonl", rows)
    write_jsonl(bad / "instruction" / "eval.jsonl", rows[:2])
    with pytest.raises(ValueError, match=r"train.jsonl row 3: key 'response'"):
        _distill(teacher, Artifact(bad), tmp_path / "a")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        _distill(teacher, tiny_data, tmp_path / "b", student=StudentConfig(hidden_size=30, num_heads=4))
    with pytest.raises(ValueError, match="missing input 'data'"):
        distill.run(DistillConfig(), {"teacher": teacher}, tmp_path)


def test_a_run_stopped_mid_step_resumes_from_its_checkpoint_to_the_same_weights(teacher, tiny_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from posttrain import failpoints
    from posttrain.training import CHECKPOINT_DIR_ENV
    from tests.kill_harness import stop_inside_step

    def weights(folder):
        return load_file(folder / "model.safetensors")

    uninterrupted = _distill(teacher, tiny_data, tmp_path / "clean", max_steps=12)
    checkpoints = tmp_path / "checkpoints"
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(checkpoints))
    stop_inside_step(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        _distill(teacher, tiny_data, tmp_path / "killed", max_steps=12, checkpoint_every=4)
    assert [path.name for path in checkpoints.iterdir()] == ["checkpoint-8"]  # the newest only, complete

    monkeypatch.setattr(failpoints, "reach", lambda *args, **kwargs: None)
    resumed = _distill(teacher, tiny_data, tmp_path / "resumed", max_steps=12, checkpoint_every=4)
    assert resumed.metrics["resumed_from_step"] == 8 and resumed.metrics["train_steps"] == 12
    expected, got = weights(tmp_path / "clean"), weights(tmp_path / "resumed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "clean")
    assert uninterrupted.metrics["resumed_from_step"] == 0
