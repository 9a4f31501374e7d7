"""PPO align branch, written here (TRL removed its PPOTrainer), structured as OpenRLHF and verl do.

    run(PpoConfig(max_steps=60), {"sft": sft, "reward": rm, "data": data}, out_dir)
    python -m tasks.align.ppo --config ppo.json --inputs inputs.json --out DIR

Models: the policy starts as the SFT model; a frozen copy of it is the reference; the critic is a
value head on a transformer body, initialised from the reward model (OpenRLHF's choice: it already
reads replies) or from the policy (`critic_init`). The reward of a reply is the weighted sum of
`rewards` (the reward model's score at the reply's end, and/or a verifiable function from
tasks/align/rewards.py) minus β·(log π − log π_ref) on every reply token; β is fixed or follows an
adaptive controller toward `kl_target` (Ziegler et al., 2019).

One step:
  1. rollout — one reply per prompt row (targeted skills), sampled at `temperature`;
  2. experience — old log-probs (policy), reference log-probs, values (critic), rewards, and the
     gold reward (exact match) on the same samples;
  3. advantages — GAE(γ, λ) over the reply tokens, returns = advantages + values, advantages
     whitened over the batch;
  4. learning — `ppo_epochs` passes over the batch in `minibatches`: the clipped policy objective,
     the clipped value loss, an optional entropy bonus, and an NLL term on replayed SFT rows of
     every skill (`replay_weight`), with gradient clipping on each model;
  5. the KL controller's update, and one entry of figures in the manifest's history (an MLflow series each).

The pure pieces — `gae`, `whiten` (rollout.masked_whiten), `policy_loss`, `value_loss`,
`kl_penalty_rewards`, `AdaptiveKL` — are unit-tested with hand-computed numbers
(tests/tasks/test_ppo.py). Output: the aligned causal LM, curves.png, the per-step history (manifest), and in the
manifest the final KL to the reference and the reward-hacking verdict (tasks/align/hacking.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from posttrain import failpoints
from posttrain.artifacts import Artifact
from posttrain.config import PpoConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_instruction_rows, read_jsonl
from posttrain.models import LikelihoodRewardModel, load_causal_lm, load_reward_model, load_tokenizer, save_pretrained
from posttrain.training import LoopCheckpoints
from tasks.align.rewards import check_names
from tasks.align.rl import hacking_verdict, print_progress, score_rollout, summary_metrics, write_curves
from tasks.align.rollout import (
    PromptSampler,
    Replay,
    cosine_schedule,
    masked_mean,
    masked_whiten,
    sample,
    select,
    token_logprobs,
)

# --------------------------------------------------------------------------- the pure pieces


def kl_penalty_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float):
    """Per-token rewards: −β·(log π − log π_ref) on every reply token, plus the sequence's score on
    its last reply token. Returns (rewards [N, R], per-sequence KL [N])."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()  # the last reply token
    rewards = rewards + last.float() * scores.unsqueeze(-1)
    return rewards, kl.sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over reply tokens. Values past the reply are 0, so the
    last token bootstraps from nothing. Returns (advantages, returns), each [N, R]."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float):
    """PPO's clipped surrogate, averaged over reply tokens; and the fraction of tokens clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float):
    """½·max((V − R)², (clip(V, V_old ± ε) − R)²), averaged over reply tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) after each batch (Ziegler et al., 2019); fixed
    when there is no target."""

    def __init__(self, beta: float, target: float | None, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    residual_var = masked_mean((returns - values - masked_mean(returns - values, mask)) ** 2, mask)
    returns_var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    return float(1 - residual_var / returns_var) if returns_var > 1e-12 else math.nan


# --------------------------------------------------------------------------- the critic


class Critic(torch.nn.Module):
    """A value per token: the transformer body of a sequence classifier and its one-output head,
    applied at every position (the classifier itself only reads the last one). From a likelihood
    reward model (posttrain.models.LikelihoodRewardModel, whose score is a log-likelihood, not a
    head on hidden states) it takes the LM's body under a fresh zero-initialised head: V = 0."""

    def __init__(self, classifier):
        super().__init__()
        if isinstance(classifier, LikelihoodRewardModel):
            self.body = classifier.lm.base_model
            self.head = torch.nn.Linear(classifier.get_input_embeddings().embedding_dim, 1, bias=False, dtype=classifier.score.weight.dtype)
            torch.nn.init.zeros_(self.head.weight)
        else:
            self.body = getattr(classifier, classifier.base_model_prefix)
            self.head = classifier.score

    def forward(self, rollout) -> torch.Tensor:
        hidden = self.body(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids).last_hidden_state
        values = self.head(hidden).squeeze(-1).float()
        return values[:, rollout.prompt_width - 1 : -1]  # the value of the state before each reply token


def load_critic(config: PpoConfig, sft_dir: Path, reward_dir: Path | None) -> Critic:
    if config.critic_init == "reward":
        if reward_dir is None:
            raise ValueError("align.ppo.critic_init: reward needs the reward model as an input")
        return Critic(load_reward_model(reward_dir))
    classifier = load_reward_model(sft_dir)  # the policy's body under a fresh one-output head
    torch.nn.init.zeros_(classifier.score.weight)  # start at V = 0 rather than noise
    return Critic(classifier)


# --------------------------------------------------------------------------- the stage


def run(config: PpoConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    from transformers import set_seed

    out_dir = Path(out_dir)
    seed = config.seed if config.seed is not None else 0
    check_names([term.name for term in config.rewards] + ([config.gold] if config.gold else []), "align.ppo.rewards")
    data_dir, sft_dir = Path(inputs["data"].path), Path(inputs["sft"].path)
    reward_dir = Path(inputs["reward"].path) if "reward" in inputs else None
    prompt_rows = read_jsonl(data_dir / "prompt" / "train.jsonl") if (data_dir / "prompt" / "train.jsonl").is_file() else []
    if not prompt_rows:
        raise ValueError(f"{data_dir / 'prompt' / 'train.jsonl'}: PPO needs prompt rows (a data source with role: prompt)")
    set_seed(seed)
    tokenizer = load_tokenizer(sft_dir)
    chat = ChatFormat(tokenizer)
    policy = load_causal_lm(sft_dir, dtype="float32")
    reference = load_causal_lm(sft_dir, dtype="float32").requires_grad_(False).eval()
    critic = load_critic(config, sft_dir, reward_dir)
    reward_model = None
    if any(term.name == "reward_model" for term in config.rewards):
        if reward_dir is None:
            raise ValueError("align.ppo.rewards: reward_model needs the reward model as an input")
        reward_model = load_reward_model(reward_dir).requires_grad_(False).eval()
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    replay = Replay(chat, read_instruction_rows(data_dir / "instruction" / "train.jsonl"), config.replay_rows, 256, seed)
    policy_optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=config.critic_lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedules = [cosine_schedule(optimizer, config.max_steps) for optimizer in (policy_optimizer, critic_optimizer)]
    controller = AdaptiveKL(config.kl_beta, config.kl_target, config.kl_horizon)
    prompts = PromptSampler(prompt_rows, seed)
    history = []
    # Resumed from the newest checkpoint of the same work: both models, both optimizers and
    # schedules, the KL controller, the RNGs, the prompt and replay samplers and the history so far.
    checkpoints = LoopCheckpoints(config.checkpoint_every, config.max_steps)
    models = {"policy": policy, "critic": critic}
    stateful = {
        "policy_optimizer": policy_optimizer,
        "critic_optimizer": critic_optimizer,
        "policy_schedule": schedules[0],
        "critic_schedule": schedules[1],
        "kl_controller": controller,
        "prompts": prompts,
        "replay": replay,
    }
    first_step, saved = checkpoints.resume(models, stateful)
    if saved is not None:
        history = list(saved["history"])
    started = time.perf_counter()
    policy.train()
    critic.train()
    for step in range(first_step + 1, config.max_steps + 1):
        rollout = sample(policy, chat, prompts.take(config.prompts_per_step), 1, config.temperature, config.max_new_tokens)
        step_started = time.perf_counter()
        mask = rollout.response_mask
        with torch.no_grad():
            old_logp, _ = token_logprobs(policy, rollout, config.temperature)
            ref_logp, _ = token_logprobs(reference, rollout, config.temperature)
            old_values = critic(rollout) * mask
            scores = score_rollout(rollout, config.rewards, config.gold, reward_model, tokenizer.pad_token_id)
            rewards, kl = kl_penalty_rewards(scores["total"], old_logp, ref_logp, mask, controller.beta)
            advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, mask)

        figures = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "entropy": [], "replay_nll": []}
        for _ in range(config.ppo_epochs):
            for chunk in torch.randperm(len(rollout.rows)).chunk(config.minibatches):
                part = select(rollout, chunk)
                part_mask = mask[chunk]
                logp, entropy = token_logprobs(policy, part, config.temperature, with_entropy=True)
                pg_loss, clip_fraction = policy_loss(logp, old_logp[chunk], advantages[chunk], part_mask, config.clip)
                entropy_mean = masked_mean(entropy, part_mask)
                loss = pg_loss - config.entropy_coef * entropy_mean
                replay_nll = replay.nll(policy) if config.replay_weight > 0 else torch.zeros(())
                loss = loss + config.replay_weight * replay_nll
                v_loss = value_loss(critic(part), old_values[chunk], returns[chunk], part_mask, config.value_clip)
                policy_optimizer.zero_grad()
                critic_optimizer.zero_grad()
                (loss + config.value_coef * v_loss).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(critic.parameters(), config.max_grad_norm)
                failpoints.reach("train-step")  # gradients computed, weights not yet updated: mid step
                policy_optimizer.step()
                critic_optimizer.step()
                for key, value in (("policy_loss", pg_loss), ("value_loss", v_loss), ("clip_fraction", clip_fraction), ("entropy", entropy_mean), ("replay_nll", replay_nll)):
                    figures[key].append(float(value.detach()) if isinstance(value, torch.Tensor) else float(value))
        for schedule in schedules:
            schedule.step()
        mean_kl = float(kl.mean())
        beta = controller.beta
        controller.update(mean_kl, len(rollout.rows))
        train_seconds = time.perf_counter() - step_started
        entry = {
            "step": step,
            "proxy_reward": float(scores["total"].mean()),
            **({"gold_reward": float(scores["gold"].mean())} if "gold" in scores else {}),
            "kl": mean_kl,
            "kl_beta": beta,
            **{key: sum(values) / len(values) for key, values in figures.items()},
            "explained_variance": explained_variance(old_values, returns, mask),
            "response_length": float(mask.sum(-1).mean()),
            "generation_seconds": rollout.seconds,
            "train_seconds": train_seconds,
            "generated_tokens_per_second": rollout.generated_tokens() / max(rollout.seconds, 1e-9),
        }
        history.append(entry)
        print_progress("ppo", step, config.max_steps, entry, started)
        checkpoints.maybe_save(step, models, stateful, {"history": history})

    save_pretrained(policy, tokenizer, out_dir)
    write_curves(out_dir, history, "ppo")
    metrics = {**summary_metrics(history, policy, started), "resumed_from_step": first_step}
    return Artifact.draft(out_dir, metrics, reward_hacking=hacking_verdict(history, config), history=history)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, PpoConfig)
