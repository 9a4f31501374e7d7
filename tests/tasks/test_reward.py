"""Reward stage: the model learns to rank held-out correct answers above wrong ones, and saves a loadable folder."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tasks.reward
from posttrain import skills
from posttrain.artifacts import Artifact
from posttrain.config import RewardConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_jsonl, write_jsonl
from posttrain.scoring import pair_ids, pairwise_metrics


@pytest.fixture(scope="module")
def max_skill_data(tmp_path_factory) -> Artifact:
    """Only the `max` skill: a ranking a 0.1M model learns from scratch in a few seconds (measured 0.91-0.96)."""
    folder = tmp_path_factory.mktemp("max-data")
    records, _ = skills.generate_rows("preference", rows=1100, seed=5, skills=["max"])
    write_jsonl(folder / "preference" / "eval.jsonl", records[:100])
    write_jsonl(folder / "preference" / "train.jsonl", records[100:])
    return Artifact(folder, {"digest": "max-data", "metrics": {}})


def test_reward_model_ranks_heldout_pairs_and_saves_what_it_measured(tiny_base, max_skill_data, tmp_path):
    config = RewardConfig(max_steps=150, batch_size=32, lr=1e-3, seed=0)
    metrics = tasks.reward.run(config, {"init": tiny_base, "data": max_skill_data}, tmp_path).metrics

    # An untrained score head is a coin flip; after training the held-out ranking is mostly right.
    assert 0.3 <= metrics["eval_before_accuracy"] <= 0.7
    assert metrics["eval_accuracy"] >= 0.8
    assert metrics["eval_accuracy_gain"] >= 0.2
    assert metrics["eval_margin"] > metrics["eval_before_margin"] + 0.5
    assert metrics["eval_pairs"] == 100 and metrics["train_pairs"] == 1000

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # The saved folder is the model that was measured: rescoring it reproduces the reported accuracy.
    eval_rows = read_jsonl(max_skill_data.path / "preference" / "eval.jsonl")
    pairs = pair_ids(ChatFormat(tokenizer).split_replies(eval_rows))
    rescored = pairwise_metrics(model, pairs, eval_rows, tokenizer.pad_token_id, config.max_length, prefix="")
    assert rescored["accuracy"] == metrics["eval_accuracy"]


def test_reward_on_mixed_skills_reports_numeric_metrics(tiny_base, tiny_data, tmp_path):
    config = RewardConfig(max_steps=10, batch_size=8, seed=0)
    metrics = tasks.reward.run(config, {"init": tiny_base, "data": tiny_data}, tmp_path).metrics

    assert metrics["train_steps"] == 10
    assert metrics["tokens_per_second"] > 0
    for key in ("eval_accuracy", "eval_before_accuracy", "eval_margin", "train_accuracy", "train_margin",
                "final_train_loss"):
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
    # Per-skill accuracies come from the rows' `skill` field: all six skills are in the fixture.
    per_skill = [key for key in metrics if key.startswith("eval_accuracy_") and key != "eval_accuracy_gain"]
    assert len(per_skill) == len(skills.SKILLS)
    assert all(isinstance(value, (int, float)) for value in metrics.values())
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "loss_history.json").is_file()
    assert not (tmp_path / "_trainer").exists()
    # The accuracy's interval brackets it; σ(margin)'s calibration and the margin histogram are kept.
    assert metrics["eval_ci95_low"] <= metrics["eval_accuracy"] <= metrics["eval_ci95_high"]
    assert 0 <= metrics["eval_preference_ece"] <= 1 and (tmp_path / "margins.png").stat().st_size > 0


def test_lora_reward_model_trains_the_adapter_and_head_and_saves_a_plain_classifier(tiny_base, tiny_data, tmp_path):
    from posttrain.config import LoraConfig

    config = RewardConfig(method="lora", lora=LoraConfig(r=4, alpha=8), max_steps=10, batch_size=8, lr=5e-3, seed=0)
    metrics = tasks.reward.run(config, {"init": tiny_base, "data": tiny_data}, tmp_path).metrics
    assert metrics["train_steps"] == 10
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1, use_safetensors=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    base_head = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=1, use_safetensors=True)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base_head.model.layers[0].self_attn.q_proj.weight)  # merged


def test_reward_rejects_bad_rows_with_one_line_error(tiny_base, tmp_path):
    data = tmp_path / "data"
    good = {"prompt": "copy ab", "chosen": "ab", "rejected": "ac"}
    write_jsonl(data / "preference" / "train.jsonl", [good, {"prompt": "copy x", "chosen": "x"}])
    write_jsonl(data / "preference" / "eval.jsonl", [good])
    inputs = {"init": tiny_base, "data": Artifact(data, {})}
    with pytest.raises(ValueError, match=r"train\.jsonl row 2: key 'rejected'"):
        tasks.reward.run(RewardConfig(max_steps=1), inputs, tmp_path / "out")

    write_jsonl(data / "preference" / "train.jsonl", [good])
    (data / "preference" / "eval.jsonl").unlink()
    with pytest.raises(ValueError, match=r"eval\.jsonl: preference split not found"):
        tasks.reward.run(RewardConfig(max_steps=1), inputs, tmp_path / "out")


# --------------------------------------------------------------------------- the likelihood head


def _rollout(tokenizer, texts: list[str], prompt_width: int):
    from types import SimpleNamespace

    ids = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(row) for row in ids)
    sequences = torch.full((len(ids), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, row_ids in enumerate(ids):
        sequences[row, : len(row_ids)] = torch.tensor(row_ids)
        mask[row, : len(row_ids)] = 1
    return SimpleNamespace(sequences=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), prompt_width=prompt_width)


def test_likelihood_head_trains_saves_as_safetensors_reloads_and_seeds_a_ppo_critic(tiny_base, max_skill_data, tmp_path):
    from posttrain.config import PpoConfig
    from posttrain.models import LikelihoodRewardModel, load_reward_model
    from posttrain.scoring import score_ids
    from tasks.align.ppo import load_critic

    config = RewardConfig(head="likelihood", max_steps=60, batch_size=32, lr=1e-3, seed=0)
    metrics = tasks.reward.run(config, {"init": tiny_base, "data": max_skill_data}, tmp_path).metrics

    # Untrained, the score is the base model's log-likelihood ratio (a random model: near chance).
    assert metrics["eval_accuracy"] >= 0.8 and metrics["eval_accuracy_gain"] >= 0.2
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    model = load_reward_model(tmp_path)  # trust_remote_code off: the class is registered at import
    assert isinstance(model, LikelihoodRewardModel) and model.config.model_type == "posttrain_likelihood_reward"
    assert model.config.num_labels == 1 and model.ref is None
    assert model.lm.lm_head.weight is model.lm.get_input_embeddings().weight  # tied, as the init's were
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    eval_rows = read_jsonl(max_skill_data.path / "preference" / "eval.jsonl")
    pairs = pair_ids(ChatFormat(tokenizer).split_replies(eval_rows))
    rescored = pairwise_metrics(model, pairs, eval_rows, tokenizer.pad_token_id, config.max_length, prefix="")
    assert rescored["accuracy"] == metrics["eval_accuracy"] and abs(rescored["margin"] - metrics["eval_margin"]) < 1e-3

    # A score is a·(summed log-probs) + b: padding a sequence does not change it.
    sequences = [pair["chosen_ids"] for pair in pairs[:4]]
    alone = torch.cat([score_ids(model, [ids], tokenizer.pad_token_id, 96) for ids in sequences])
    assert torch.allclose(alone, score_ids(model, sequences, tokenizer.pad_token_id, 96), atol=1e-4)

    # PPO's critic from it: the LM's body under a fresh zero value head.
    critic = load_critic(PpoConfig(critic_init="reward"), tiny_base.path, tmp_path)
    assert torch.equal(critic.body.embed_tokens.weight, model.lm.model.embed_tokens.weight)
    values = critic(_rollout(tokenizer, ["Q: max 3 5\nA: 5</s>", "Q: max 3 5\nA: 3"], prompt_width=12))
    assert values.shape[0] == 2 and torch.count_nonzero(values) == 0
    assert any(parameter.requires_grad for parameter in critic.head.parameters())


def test_ppo_runs_with_a_likelihood_reward_model_as_reward_and_critic(tiny_base, tiny_data, max_skill_data, tmp_path):
    from posttrain.config import PpoConfig
    from tasks.align import ppo

    tasks.reward.run(RewardConfig(head="likelihood", max_steps=5, batch_size=8, seed=0), {"init": tiny_base, "data": max_skill_data}, tmp_path / "rm")
    reward = Artifact(tmp_path / "rm", {"digest": "likelihood-rm", "metrics": {}})
    config = PpoConfig(max_steps=2, prompts_per_step=4, max_new_tokens=8, rewards=[{"name": "reward_model"}], critic_init="reward", seed=0)
    metrics = ppo.run(config, {"sft": tiny_base, "data": tiny_data, "reward": reward}, tmp_path / "ppo").metrics
    assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float))


def test_likelihood_head_with_a_frozen_reference_keeps_the_reference_and_lora_merges(tiny_base, max_skill_data, tmp_path):
    from posttrain.config import LoraConfig
    from posttrain.models import load_causal_lm, load_reward_model

    config = RewardConfig(head="likelihood", reference=True, max_steps=60, batch_size=32, lr=1e-3, seed=0)
    metrics = tasks.reward.run(config, {"init": tiny_base, "data": max_skill_data}, tmp_path / "full").metrics
    # β(log π − log π_ref) is 0 for every pair before training: no pair is ranked (accuracy counts chosen > rejected).
    assert metrics["eval_before_accuracy"] == 0 and metrics["eval_accuracy"] >= 0.8
    model, base = load_reward_model(tmp_path / "full"), load_causal_lm(tiny_base.path)
    assert all(torch.equal(a, b) for a, b in zip(model.ref.state_dict().values(), base.state_dict().values()))
    assert not torch.equal(model.lm.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)

    lora = RewardConfig(head="likelihood", method="lora", lora=LoraConfig(r=4, alpha=8), max_steps=10, batch_size=8, lr=5e-3, seed=0)
    tasks.reward.run(lora, {"init": tiny_base, "data": max_skill_data}, tmp_path / "lora")
    merged = load_reward_model(tmp_path / "lora")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert not torch.equal(merged.lm.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
