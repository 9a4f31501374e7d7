"""DPO branch: the policy moves away from the reference in the preferred direction, and saves a loadable folder."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.artifacts import Artifact
from posttrain.config import DpoConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_jsonl, write_jsonl
from posttrain.models import load_tokenizer
from tasks.align import dpo


def implicit_reward_on(rows, policy, reference, tokenizer, beta):
    """Accuracy and mean margin of β·(log π − log π_ref), chosen vs rejected, recomputed outside the run."""
    parts = ChatFormat(tokenizer).split_replies(rows)
    ref_chosen, ref_rejected = dpo.pair_logps(reference, parts, tokenizer.pad_token_id, 96)
    chosen, rejected = dpo.pair_logps(policy, parts, tokenizer.pad_token_id, 96)
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return (margin > 0).float().mean().item(), margin.mean().item(), (chosen - ref_chosen).mean().item()


def test_dpo_prefers_chosen_on_train_pairs_and_saves_a_changed_model(tiny_base, tiny_data, tmp_path):
    # Plain DPO (no NLL term): on a random-init model the NLL term would dominate the preference signal.
    config = DpoConfig(max_steps=60, batch_size=16, lr=1e-3, beta=0.1, sft_weight=0.0, seed=0)
    metrics = dpo.run(config, {"sft": tiny_base, "data": tiny_data}, tmp_path).metrics

    # 60 steps x 16 pairs covers the 270 train pairs, so the reference log-probs were precomputed once.
    assert metrics["reference_precomputed"] == 1
    assert metrics["train_steps"] == 60 and metrics["seconds_per_step"] > 0
    assert all(isinstance(value, (int, float)) and math.isfinite(value) for value in metrics.values())
    assert metrics["eval_before_implicit_reward_accuracy"] == 0.5  # policy == reference: every reward ties
    assert metrics["train_rewards_accuracy"] > 0.5 and metrics["train_rewards_margin"] > 0

    policy = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_base.path, use_safetensors=True)
    trained = policy.state_dict()
    changed = [name for name, weight in reference.state_dict().items() if not torch.equal(weight, trained[name])]
    assert len(changed) >= len(reference.state_dict()) // 2

    # Recomputed here from the saved folder against the untouched SFT folder (the stage's own numbers not trusted).
    tokenizer = load_tokenizer(tmp_path)
    train_rows = read_jsonl(tiny_data.path / "preference" / "train.jsonl")
    accuracy, margin, _ = implicit_reward_on(train_rows, policy, reference, tokenizer, config.beta)
    assert accuracy >= 0.8  # measured 0.89
    assert margin > 0.05  # measured 0.12
    eval_rows = read_jsonl(tiny_data.path / "preference" / "eval.jsonl")
    eval_accuracy, _, _ = implicit_reward_on(eval_rows, policy, reference, tokenizer, config.beta)
    assert eval_accuracy == pytest.approx(metrics["eval_implicit_reward_accuracy"], abs=1e-3)


def test_nll_term_raises_chosen_likelihood_on_the_explicit_reference_path(tiny_base, tiny_data, tmp_path):
    # 30 steps x 8 pairs < 270 train pairs: the explicit reference-model path (no precompute) runs here.
    runs = {}
    for sft_weight in (0.0, 1.0):
        config = DpoConfig(max_steps=30, batch_size=8, lr=1e-3, sft_weight=sft_weight, seed=0)
        runs[sft_weight] = dpo.run(config, {"sft": tiny_base, "data": tiny_data}, tmp_path / str(sft_weight)).metrics
    assert runs[0.0]["reference_precomputed"] == 0 and runs[1.0]["reference_precomputed"] == 0
    # A reference that moved with the policy would give rewards of exactly 0.
    assert runs[0.0]["train_rewards_margin"] > 0 and runs[0.0]["eval_implicit_reward_margin"] > 0
    # Plain DPO barely moves the chosen answers' likelihood (measured +0.05 nats); the NLL term raises it (+4.4).
    assert runs[1.0]["eval_chosen_logp_change"] > runs[0.0]["eval_chosen_logp_change"] + 1.0


def test_dpo_rejects_identical_pair(tiny_base, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "preference" / "train.jsonl", [{"prompt": "copy ab", "chosen": "ab", "rejected": "ab"}])
    write_jsonl(data / "preference" / "eval.jsonl", [{"prompt": "copy ab", "chosen": "ab", "rejected": "ac"}])
    with pytest.raises(ValueError, match=r"train\.jsonl row 1: chosen and rejected are identical"):
        dpo.run(DpoConfig(max_steps=1), {"sft": tiny_base, "data": Artifact(data, {})}, tmp_path / "out")


def test_a_run_stopped_mid_step_resumes_to_the_same_weights_and_replay_rows(tiny_base, tiny_data, tmp_path, monkeypatch):
    # With the replay term on, the resumed run must also draw the replay rows the uninterrupted one
    # drew after step 8: its sampler's RNG is saved beside each checkpoint.
    from safetensors.torch import load_file

    from posttrain import failpoints
    from posttrain.training import CHECKPOINT_DIR_ENV
    from tests.kill_harness import stop_inside_step

    config = DpoConfig(max_steps=12, batch_size=8, seed=0, replay_weight=1.0, replay_rows=4, checkpoint_every=4, reference="model")
    inputs = {"sft": tiny_base, "data": tiny_data}
    clean = dpo.run(config, inputs, tmp_path / "clean")
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    stop_inside_step(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(config, inputs, tmp_path / "killed")
    (checkpoint,) = (tmp_path / "checkpoints").glob("checkpoint-*")
    assert checkpoint.name == "checkpoint-8" and (checkpoint / "replay_rng.json").is_file()

    monkeypatch.setattr(failpoints, "reach", lambda *args, **kwargs: None)
    resumed = dpo.run(config, inputs, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 8 and clean.metrics["resumed_from_step"] == 0
    expected, got = load_file(tmp_path / "clean" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert (tmp_path / "resumed" / "loss_history.json").read_text() == (tmp_path / "clean" / "loss_history.json").read_text()
