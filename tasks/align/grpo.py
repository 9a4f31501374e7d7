"""GRPO align branch: group-relative policy optimisation, a loop of our own on PPO's rollout code.

    run(GrpoConfig(max_steps=40), {"sft": sft, "data": data}, out_dir)          # + "reward" for reward_model
    python -m tasks.align.grpo --config grpo.json --inputs inputs.json --out DIR

Why not TRL's GRPOTrainer: it has no dynamic sampling (huggingface/trl#3708, open), which this
stage needs to learn at all on a small model — a prototype with G = 4 found 84–91 % of groups all
right or all wrong, so most advantages were zero. And it renders prompts itself; this loop samples
through the same `tasks/align/rollout.py` as PPO, on posttrain's chat template.

One step (DeepSeekMath's GRPO with DAPO's dynamic sampling and token-level loss):
  1. `prompts_per_step` prompt rows, `group_size` replies each at `temperature`;
  2. rewards: the weighted `rewards` terms (by default exact match plus partial credit, normalised
     edit similarity, which is dense where exact match is not); the gold reward on the same samples;
  3. dynamic sampling: a group whose rewards are all equal carries no signal (every advantage 0);
     it is replaced by a fresh prompt's group, for up to `max_resample_rounds` rounds. The fraction
     of zero-variance groups is logged every step;
  4. advantage of reply i in its group: (r_i − mean) / std (`scale_rewards`; without it, Dr. GRPO's
     r_i − mean), on every token of the reply;
  5. loss, averaged over every reply token of the batch: −A·π/π_sg (one update per rollout, so the
     ratio is 1 and this is the policy gradient) + β·k3-KL to the SFT model, plus the NLL term on
     replayed SFT rows (`replay_weight`); gradient clipping.
Output: the aligned causal LM, curves.png, the per-step history (manifest), the final KL and the reward-hacking verdict.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain import failpoints
from posttrain.artifacts import Artifact
from posttrain.config import GrpoConfig
from posttrain.formatting import ChatFormat
from posttrain.jsonl import read_instruction_rows, read_jsonl
from posttrain.models import load_causal_lm, load_reward_model, load_tokenizer, save_pretrained
from posttrain.training import LoopCheckpoints
from tasks.align.rewards import check_names
from tasks.align.rl import hacking_verdict, print_progress, score_rollout, summary_metrics, write_curves
from tasks.align.rollout import (
    PromptSampler,
    Replay,
    cosine_schedule,
    sample,
    select,
    token_logprobs,
)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """Per reply (r − group mean), divided by the group's std when `scale`; zero in a group of equal rewards."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(-1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have rewards that differ (a group of equal rewards gives no gradient)."""
    grouped = rewards.view(-1, group_size)
    return (grouped.max(-1).values - grouped.min(-1).values) > 1e-6


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The per-token estimate exp(q − p) − (q − p) − 1 of KL(π‖π_ref) (Schulman), ≥ 0, unbiased."""
    difference = ref_logp - logp
    return torch.exp(difference) - difference - 1


def run(config: GrpoConfig, inputs: dict[str, Artifact], out_dir: Path) -> Artifact:
    from transformers import set_seed

    out_dir = Path(out_dir)
    seed = config.seed if config.seed is not None else 0
    check_names([term.name for term in config.rewards] + ([config.gold] if config.gold else []), "align.grpo.rewards")
    data_dir, sft_dir = Path(inputs["data"].path), Path(inputs["sft"].path)
    prompt_file = data_dir / "prompt" / "train.jsonl"
    prompt_rows = read_jsonl(prompt_file) if prompt_file.is_file() else []
    if not prompt_rows:
        raise ValueError(f"{prompt_file}: GRPO needs prompt rows (a data source with role: prompt)")
    set_seed(seed)
    tokenizer = load_tokenizer(sft_dir)
    chat = ChatFormat(tokenizer)
    policy = load_causal_lm(sft_dir, dtype="float32")
    reference = load_causal_lm(sft_dir, dtype="float32").requires_grad_(False).eval()
    reward_model = None
    if any(term.name == "reward_model" for term in config.rewards):
        if "reward" not in inputs:
            raise ValueError("align.grpo.rewards: reward_model needs the reward model as an input")
        reward_model = load_reward_model(inputs["reward"].path).requires_grad_(False).eval()
        reward_model.config.pad_token_id = tokenizer.pad_token_id
    replay = Replay(chat, read_instruction_rows(data_dir / "instruction" / "train.jsonl"), config.replay_rows, 256, seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = cosine_schedule(optimizer, config.max_steps)
    prompts = PromptSampler(prompt_rows, seed)
    group = config.group_size
    history = []
    # Resumed from the newest checkpoint of the same work: weights, optimizer, schedule, the RNGs
    # that draw the samples, the prompt and replay samplers' positions, and the history so far.
    checkpoints = LoopCheckpoints(config.checkpoint_every, config.max_steps)
    models, stateful = {"policy": policy}, {"optimizer": optimizer, "schedule": schedule, "prompts": prompts, "replay": replay}
    first_step, saved = checkpoints.resume(models, stateful)
    if saved is not None:
        history = list(saved["history"])
    started = time.perf_counter()
    policy.train()
    for step in range(first_step + 1, config.max_steps + 1):
        # -- rollouts, with dynamic sampling --------------------------------------------------
        kept, drawn, generation_seconds, generated = [], [], 0.0, 0
        rows, rounds = prompts.take(config.prompts_per_step), 0
        while rows:
            rollout = sample(policy, chat, rows, group, config.temperature, config.max_new_tokens)
            generation_seconds += rollout.seconds
            generated += rollout.generated_tokens()
            scores = score_rollout(rollout, config.rewards, config.gold, reward_model, tokenizer.pad_token_id)
            informative = informative_groups(scores["total"], group)
            drawn.append((scores, informative))
            keep = informative if config.dynamic_sampling else torch.ones_like(informative)
            index = torch.arange(len(rollout.rows)).view(-1, group)[keep].reshape(-1)
            if len(index):
                advantages = group_advantages(scores["total"], group, config.scale_rewards)[index]
                kept.append((select(rollout, index), advantages))
            missing = config.prompts_per_step - sum(len(part.rows) // group for part, _ in kept)
            rounds += 1
            rows = prompts.take(missing) if config.dynamic_sampling and missing > 0 and rounds <= config.max_resample_rounds else []

        # -- one policy update over every kept reply token -----------------------------------
        update_started = time.perf_counter()
        tokens = sum(float(part.response_mask.sum()) for part, _ in kept)
        optimizer.zero_grad()
        kl_sum, kl_count, entropy_sum = 0.0, 0, 0.0
        for part, advantages in kept:
            mask = part.response_mask
            logp, entropy = token_logprobs(policy, part, config.temperature, with_entropy=True)
            with torch.no_grad():
                ref_logp, _ = token_logprobs(reference, part, config.temperature)
            ratio = torch.exp(logp - logp.detach())  # 1, with the policy gradient's derivative
            per_token = -advantages.unsqueeze(-1) * ratio + config.kl_beta * k3_kl(logp, ref_logp)
            ((per_token * mask).sum() / max(tokens, 1.0)).backward()
            kl_sum += float(((logp - ref_logp).detach() * mask).sum())
            kl_count += len(part.rows)
            entropy_sum += float((entropy.detach() * mask).sum())
        replay_nll = replay.nll(policy) if config.replay_weight > 0 else torch.zeros(())
        if config.replay_weight > 0:
            (config.replay_weight * replay_nll).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.max_grad_norm)
        failpoints.reach("train-step")  # gradients computed, weights not yet updated: mid step
        optimizer.step()
        schedule.step()

        totals = torch.cat([scores["total"] for scores, _ in drawn])
        groups_drawn = torch.cat([informative for _, informative in drawn])
        entry = {
            "step": step,
            "proxy_reward": float(totals.mean()),
            **({"gold_reward": float(torch.cat([s["gold"] for s, _ in drawn]).mean())} if all("gold" in s for s, _ in drawn) else {}),
            "kl": kl_sum / max(kl_count, 1),
            "entropy": entropy_sum / max(tokens, 1.0),
            "zero_variance_fraction": float((~groups_drawn).float().mean()),
            "resample_rounds": rounds - 1,
            "groups_trained": sum(len(part.rows) // group for part, _ in kept),
            "replay_nll": float(replay_nll.detach()),
            "response_length": tokens / max(sum(len(part.rows) for part, _ in kept), 1),
            "generation_seconds": generation_seconds,
            "train_seconds": time.perf_counter() - update_started,
            "generated_tokens_per_second": generated / max(generation_seconds, 1e-9),
        }
        history.append(entry)
        print_progress("grpo", step, config.max_steps, entry, started)
        checkpoints.maybe_save(step, models, stateful, {"history": history})

    save_pretrained(policy, tokenizer, out_dir)
    write_curves(out_dir, history, "grpo")
    metrics = {**summary_metrics(history, policy, started), "resumed_from_step": first_step}
    metrics["zero_variance_fraction"] = round(sum(h["zero_variance_fraction"] for h in history) / len(history), 4)
    return Artifact.draft(out_dir, metrics, reward_hacking=hacking_verdict(history, config), history=history)


if __name__ == "__main__":
    from posttrain.stage_cli import main

    main(run, GrpoConfig)
