"""The RL stages end to end on a tiny model: PPO and GRPO train, log their curves, and the
reward-hacking detector flags a deliberately flawed reward; DPO builds on-policy pairs.

The tiny model cannot learn a skill in a unit test's time, but after 100 SFT steps on one skill it
reliably answers in the right *format* — a short reply that ends with its end-of-turn token — so
`format` serves as the gold (verifiable) reward here. A reward that pays for length is the flawed
proxy: optimising it teaches the model to stop ending its replies, so the proxy rises while the
gold falls, which is exactly what the detector must catch.
"""

from __future__ import annotations


import pytest
import torch

from posttrain import skills
from posttrain.artifacts import Artifact
from posttrain.config import GrpoConfig, PpoConfig, SftConfig
from posttrain.formatting import ChatFormat, parse_completion
from posttrain.jsonl import read_jsonl, write_jsonl
from posttrain.models import load_causal_lm, load_tokenizer
from tasks import sft
from tasks.align import dpo, grpo, ppo

RL_FIGURES = {"step", "proxy_reward", "gold_reward", "kl", "entropy", "response_length", "generation_seconds", "train_seconds", "generated_tokens_per_second"}


@pytest.fixture(scope="module")
def upper_data(tmp_path_factory) -> Artifact:
    folder = tmp_path_factory.mktemp("upper-data")
    for role, rows in (("instruction", 1000), ("prompt", 120)):
        records, _ = skills.generate_rows(role, rows=rows, seed=3, skills=["upper"])
        write_jsonl(folder / role / "eval.jsonl", records[:20])
        write_jsonl(folder / role / "train.jsonl", records[20:])
    return Artifact(folder, {"digest": "upper-data", "metrics": {}})


@pytest.fixture(scope="module")
def formatted_sft(tiny_base, upper_data, tmp_path_factory) -> Artifact:
    folder = tmp_path_factory.mktemp("formatted-sft")
    sft.run(SftConfig(max_steps=100, batch_size=32, lr=3e-3, warmup_steps=10, eval_rows=20, seed=0), {"base": tiny_base, "data": upper_data}, folder)
    return Artifact(folder, {"digest": "formatted-sft", "metrics": {}})


def settings(**overrides) -> dict:
    return {"max_steps": 40, "lr": 1e-3, "gold": "format", "replay_weight": 0.0, "max_new_tokens": 12, "hacking": {"window": 5}, "seed": 0, **overrides}


def test_a_reward_that_pays_for_length_raises_the_hacking_flag_in_grpo_and_ppo(formatted_sft, upper_data, tmp_path):
    runs = {
        "grpo": grpo.run(GrpoConfig(**settings(prompts_per_step=4, group_size=8, rewards=[{"name": "length"}])), {"sft": formatted_sft, "data": upper_data}, tmp_path / "grpo"),
        "ppo": ppo.run(
            PpoConfig(**settings(prompts_per_step=16, rewards=[{"name": "length"}], critic_init="policy")), {"sft": formatted_sft, "data": upper_data}, tmp_path / "ppo"
        ),
    }
    for method, artifact in runs.items():
        verdict = artifact.manifest["reward_hacking"]
        assert verdict["flag"] is True, (method, verdict)
        assert verdict["proxy_delta"] > 0 and verdict["gold_delta"] <= -0.05 and not verdict["proxy_is_gold"]
        assert artifact.metrics["gold_reward_first"] > 0.5  # it started out answering in the format
        assert artifact.metrics["proxy_reward_last"] > artifact.metrics["proxy_reward_first"]
        assert artifact.metrics["final_kl"] > 0  # it trained away from the reference
        history = artifact.manifest["history"]  # in the manifest: its timings must not change the digest
        assert len(history) == 40 and RL_FIGURES <= set(history[0])
        assert not (tmp_path / method / "history.json").exists()
        assert (tmp_path / method / "curves.png").stat().st_size > 0
    ppo_history = runs["ppo"].manifest["history"]
    assert {"clip_fraction", "value_loss", "explained_variance", "kl_beta"} <= set(ppo_history[0])


def test_training_on_the_gold_reward_itself_is_never_flagged(formatted_sft, upper_data, tmp_path):
    artifact = grpo.run(GrpoConfig(**settings(prompts_per_step=4, group_size=8, rewards=[{"name": "format"}])), {"sft": formatted_sft, "data": upper_data}, tmp_path)
    verdict = artifact.manifest["reward_hacking"]
    assert verdict["flag"] is False and verdict["proxy_is_gold"] is True
    history = artifact.manifest["history"]
    assert all(0.0 <= entry["zero_variance_fraction"] <= 1.0 for entry in history)
    assert all(entry["groups_trained"] <= 4 for entry in history)
    assert load_causal_lm(tmp_path).config.vocab_size == load_causal_lm(formatted_sft.path).config.vocab_size


def test_an_unknown_reward_is_one_line_before_any_model_loads(formatted_sft, upper_data, tmp_path):
    with pytest.raises(ValueError, match=r"align.grpo.rewards: unknown reward 'lenght'; known: .*length"):
        grpo.run(GrpoConfig(rewards=[{"name": "lenght"}]), {"sft": formatted_sft, "data": upper_data}, tmp_path)


def test_on_policy_pairs_are_the_models_own_mistakes_against_the_right_answer(formatted_sft, upper_data):
    rows = read_jsonl(upper_data.path / "prompt" / "train.jsonl")[:24]
    tokenizer = load_tokenizer(formatted_sft.path)
    pairs = dpo.on_policy_pairs(load_causal_lm(formatted_sft.path), ChatFormat(tokenizer), rows, samples=4, temperature=1.0, seed=0)
    answers = {row["prompt"]: row["answer"] for row in rows}
    assert pairs, "a 100-step model gets most answers wrong"
    per_prompt: dict[str, list[str]] = {}
    for pair in pairs:
        assert pair["chosen"] == answers[pair["prompt"]] and pair["rejected"] != pair["chosen"]
        assert pair["rejected"] == parse_completion(pair["rejected"]) and pair["rejected"]
        per_prompt.setdefault(pair["prompt"], []).append(pair["rejected"])
    assert all(len(wrong) <= 2 and len(set(wrong)) == len(wrong) for wrong in per_prompt.values())


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_a_run_stopped_mid_step_resumes_to_the_weights_of_an_uninterrupted_run(method, formatted_sft, upper_data, tmp_path, monkeypatch):
    # Sampling, the prompt and replay samplers, the optimizers, the schedules and (PPO) the critic
    # and the adaptive KL coefficient all carry state across steps: a resume must restore every one.
    from safetensors.torch import load_file

    from posttrain import failpoints
    from posttrain.training import CHECKPOINT_DIR_ENV
    from tests.kill_harness import stop_inside_step

    common = {"max_steps": 6, "checkpoint_every": 2, "replay_weight": 0.5, "replay_rows": 4, "rewards": [{"name": "format"}]}
    if method == "grpo":
        stage, config = grpo, GrpoConfig(**settings(**common, prompts_per_step=2, group_size=4))
    else:
        stage, config = ppo, PpoConfig(**settings(**common, prompts_per_step=4, critic_init="policy", kl_target=0.05))
    inputs = {"sft": formatted_sft, "data": upper_data}
    clean = stage.run(config, inputs, tmp_path / "clean")
    monkeypatch.setenv(CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    stop_inside_step(monkeypatch, 5, 1 if method == "grpo" else config.ppo_epochs * config.minibatches)
    with pytest.raises(KeyboardInterrupt):
        stage.run(config, inputs, tmp_path / "killed")
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-4"]

    monkeypatch.setattr(failpoints, "reach", lambda *args, **kwargs: None)
    resumed = stage.run(config, inputs, tmp_path / "resumed")
    assert resumed.metrics["resumed_from_step"] == 4 and resumed.metrics["train_steps"] == 6
    expected, got = load_file(tmp_path / "clean" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    drop_clock = lambda history: [{k: v for k, v in entry.items() if "second" not in k} for entry in history]  # noqa: E731
    assert drop_clock(resumed.manifest["history"]) == drop_clock(clean.manifest["history"])
