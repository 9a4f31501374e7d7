"""What PPO and GRPO share beyond sampling: a rollout's rewards, the per-step figures, the
reward-hacking verdict and the curves.

    scores = score_rollout(rollout, config.rewards, config.gold, reward_model, pad_id)
    write_curves(out_dir, history, "ppo")           # curves.png; the history itself goes in the manifest
    Artifact.draft(out_dir, summary_metrics(history, policy, started), reward_hacking=hacking_verdict(history, config))
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.models import count_parameters
from tasks.align import hacking
from tasks.align.rewards import REWARD_FUNCTIONS, RewardContext, total_reward
from tasks.align.rollout import Rollout


def score_rollout(rollout: Rollout, terms, gold: str | None, reward_model=None, pad_id: int = 0) -> dict:
    """The training reward per sequence (the weighted terms), each term, and the gold reward."""
    names = {term.name for term in terms} | ({gold} if gold else set())
    context = RewardContext(
        reward_model=reward_model,
        sequences=rollout.prompt_and_reply_ids() if "reward_model" in names else [],
        ended=rollout.ended,
        pad_id=pad_id,
    )
    totals, per_term = total_reward(terms, rollout.rows, rollout.replies, context)
    scores = {"total": torch.tensor(totals), "terms": per_term}
    if gold and all(isinstance(row.get("answer"), str) for row in rollout.rows):
        scores["gold"] = torch.tensor(per_term[gold] if gold in per_term else REWARD_FUNCTIONS[gold](rollout.rows, rollout.replies, context))
    return scores


def hacking_verdict(history: list[dict], config) -> dict | None:
    """The verdict when a reward other than the gold one drove training and gold was scored."""
    if not history or "gold_reward" not in history[0]:
        return None
    trained_on_gold_only = [term.name for term in config.rewards] == [config.gold]
    verdict = hacking.detect([h["proxy_reward"] for h in history], [h["gold_reward"] for h in history], config.hacking.window, config.hacking.min_gold_drop)
    return {**verdict, "proxy_is_gold": trained_on_gold_only}


def summary_metrics(history: list[dict], policy, started: float) -> dict:
    """The manifest's figures: first and last windows of the curves, the final KL, time split."""
    window = max(1, min(10, len(history) // 4))
    first, last = history[:window], history[-window:]

    def mean(rows, key):
        return round(sum(row[key] for row in rows) / len(rows), 5)

    metrics = {
        "train_steps": len(history),
        "train_seconds": round(time.perf_counter() - started, 2),
        "generation_seconds": round(sum(h["generation_seconds"] for h in history), 2),
        "update_seconds": round(sum(h["train_seconds"] for h in history), 2),
        "generated_tokens_per_second": round(mean(history, "generated_tokens_per_second"), 1),
        "proxy_reward_first": mean(first, "proxy_reward"),
        "proxy_reward_last": mean(last, "proxy_reward"),
        "final_kl": mean(last, "kl"),
        "parameters": count_parameters(policy),
    }
    if "gold_reward" in history[0]:
        metrics.update({"gold_reward_first": mean(first, "gold_reward"), "gold_reward_last": mean(last, "gold_reward")})
    return metrics


def print_progress(method: str, step: int, total: int, entry: dict, started: float, every: float = 10.0) -> None:
    now = time.perf_counter()
    if step != total and now - getattr(print_progress, "last", 0.0) < every:
        return
    print_progress.last = now
    from rich.console import Console

    gold = f" gold {entry['gold_reward']:.3f}" if "gold_reward" in entry else ""
    Console(stderr=True).print(
        f"  [cyan]{method}[/] step {step}/{total} reward {entry['proxy_reward']:.3f}{gold} kl {entry['kl']:.3f}  {now - started:.0f}s",
        highlight=False,
    )


def write_curves(out_dir: Path, history: list[dict], title: str) -> None:
    """curves.png: proxy reward, gold reward and KL to the reference per step. The per-step history
    itself (seconds and tokens/s among its figures) goes in the manifest, not in a file, so the
    artifact's bytes are the same on a rebuild; the flow logs each figure as an MLflow series."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    figure, (rewards_axis, kl_axis) = plt.subplots(1, 2, figsize=(8.4, 3.2))
    for key, label in (("proxy_reward", "training reward"), ("gold_reward", "gold (verifiable)")):
        if all(key in entry for entry in history):
            rewards_axis.plot(steps, [entry[key] for entry in history], label=label)
    rewards_axis.set(xlabel="step", title=f"{title}: rewards")
    rewards_axis.legend(fontsize=8)
    kl_axis.plot(steps, [entry["kl"] for entry in history], color="tab:red")
    kl_axis.set(xlabel="step", title="KL to the SFT model (nats / reply)")
    figure.tight_layout()
    figure.savefig(Path(out_dir) / "curves.png", dpi=110)
    plt.close(figure)
