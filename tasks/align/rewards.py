"""Reward functions for the RL stages (PPO, GRPO), by name: a small registry users extend.

    scores = REWARD_FUNCTIONS["partial_credit"](rows, replies, context)   # one float per reply
    @reward_function("my_reward")
    def my_reward(rows, replies, context): ...                            # then `rewards: [{name: my_reward}]`

A reward function takes the prompt rows (`{"prompt", "answer"?, ...}`, one per reply), the decoded
replies and a `RewardContext` (the run's reward model and the token ids, for `reward_model`), and
returns one float per reply. A stage's training reward is the weighted sum of the terms its config
lists; its `gold` names the verifiable one scored on the same samples for the reward-hacking check.

Shipped:
- `exact_match`: 1 when the reply's answer (its first line, stripped) is the row's `answer`;
- `partial_credit`: normalised edit similarity of that answer to the row's `answer`, 1 − d/max(len)
  (dense where exact match is sparse: "ccnsyz" for "ccnryz" earns 5/6);
- `format`: 1 when the reply ended with the end-of-turn token and is one non-empty line;
- `reward_model`: the run's reward model's score of prompt + reply (a learned proxy);
- `length`: characters in the reply / 16 — a deliberately flawed reward that pays for length, used
  to prove the hacking detector (never a sensible training signal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from posttrain.formatting import parse_completion

RewardFunction = Callable[[list[dict], list[str], "RewardContext"], list[float]]
REWARD_FUNCTIONS: dict[str, RewardFunction] = {}


@dataclass
class RewardContext:
    """What a reward may need beyond the text: the reward model and the sequences' token ids."""

    reward_model: object | None = None
    sequences: list[list[int]] = field(default_factory=list)  # prompt + reply ids, one per reply
    ended: list[bool] = field(default_factory=list)  # the reply ended with a stop token
    pad_id: int = 0
    max_length: int = 2048


def reward_function(name: str):
    """Register `fn(rows, replies, context) -> list[float]` under `name`."""

    def register(fn: RewardFunction) -> RewardFunction:
        REWARD_FUNCTIONS[name] = fn
        return fn

    return register


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), two rows of the table."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _answers(rows: list[dict]) -> list[str]:
    missing = [row.get("prompt", "?") for row in rows if not isinstance(row.get("answer"), str)]
    if missing:
        raise ValueError(f"a verifiable reward needs an `answer` in every prompt row; {missing[0]!r} has none")
    return [row["answer"].strip() for row in rows]


@reward_function("exact_match")
def exact_match(rows: list[dict], replies: list[str], context: RewardContext) -> list[float]:
    return [float(parse_completion(reply) == answer) for reply, answer in zip(replies, _answers(rows))]


@reward_function("partial_credit")
def partial_credit(rows: list[dict], replies: list[str], context: RewardContext) -> list[float]:
    scores = []
    for reply, answer in zip(replies, _answers(rows)):
        given = parse_completion(reply)
        scores.append(1.0 - edit_distance(given, answer) / max(len(given), len(answer), 1))
    return scores


@reward_function("format")
def format_reward(rows: list[dict], replies: list[str], context: RewardContext) -> list[float]:
    ended = context.ended or [True] * len(replies)
    return [float(done and bool(reply.strip()) and "\n" not in reply.strip()) for reply, done in zip(replies, ended)]


@reward_function("reward_model")
def reward_model(rows: list[dict], replies: list[str], context: RewardContext) -> list[float]:
    from posttrain.scoring import score_ids

    if context.reward_model is None:
        raise ValueError("reward `reward_model` needs the run's reward model as an input (align-ppo gets it; align-grpo when configured)")
    return score_ids(context.reward_model, context.sequences, context.pad_id, context.max_length).tolist()


@reward_function("length")
def length(rows: list[dict], replies: list[str], context: RewardContext) -> list[float]:
    return [len(reply.strip()) / 16 for reply in replies]


def check_names(names: list[str], where: str) -> None:
    """One line naming the unknown reward and the known ones, before any model is loaded."""
    for name in names:
        if name not in REWARD_FUNCTIONS:
            raise ValueError(f"{where}: unknown reward {name!r}; known: {', '.join(sorted(REWARD_FUNCTIONS))}")


def total_reward(terms, rows: list[dict], replies: list[str], context: RewardContext) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of the configured terms, and each term's scores (for logging)."""
    per_term = {term.name: REWARD_FUNCTIONS[term.name](rows, replies, context) for term in terms}
    totals = [sum(term.weight * per_term[term.name][i] for term in terms) for i in range(len(replies))]
    return totals, per_term
