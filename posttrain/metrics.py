"""The evaluation metrics, as pure functions over saved generations (no model, no files).

    expected_calibration_error([0.9, 0.2], [True, False], bins=10)     # 0.15
    fit_temperature(token_logits, correct)                             # T that calibrates
    majority_vote(["4", "5", "4"])                                     # "4"
    best_of_n(["4", "5"], [0.1, 0.7])                                  # "5"
    curve(items, ks, "self_consistency")                               # {k: accuracy}
    win_rate([1.0, 0.0], [0.0, 0.0])                                   # 0.75

Calibration: a reply's confidence is its sequence probability, the product of its tokens'
probabilities. Each generated token is saved with its logits (the chosen token first, then the
top others: tasks/evaluate.py), so the probability can be recomputed at any temperature T:
log p_T(token) = z_chosen / T - logsumexp(z / T). `fit_temperature` picks the T that minimises
the binary cross-entropy between p_T(reply) and correctness on the calibration split — temperature
scaling (Guo et al., 2017) with the sequence as the unit.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

# Metrics where a smaller value is the better model; every other metric is higher-is-better. The gate
# and the candidate choice read this, so `gate.primary_metric: completion_loss` ranks models correctly.
LOWER_IS_BETTER = frozenset({"completion_loss", "perplexity", "ece", "ece_scaled", "alignment_tax", "forgetting"})


def goodness(metric: str, value: float) -> float:
    """`value` oriented so that larger is better, whatever the metric's own direction."""
    return -value if metric in LOWER_IS_BETTER else value


TEMPERATURE_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))  # 0.05 .. 20, geometric


def _logsumexp(values: np.ndarray, axis: int = -1) -> np.ndarray:
    top = values.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def sequence_logprob(token_logits: np.ndarray, temperature: float = 1.0) -> float:
    """Sum over tokens of log p_T(chosen): `token_logits` is [tokens, k], column 0 the chosen token."""
    if token_logits.size == 0:
        return 0.0
    scaled = np.asarray(token_logits, dtype=np.float64) / temperature
    return float((scaled[:, 0] - _logsumexp(scaled)).sum())


def expected_calibration_error(confidences, correct, bins: int = 10) -> float:
    """Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over equal-width confidence bins."""
    table = reliability_bins(confidences, correct, bins)
    total = sum(row["count"] for row in table)
    if total == 0:
        return math.nan
    return float(sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in table if row["count"]))


def reliability_bins(confidences, correct, bins: int = 10) -> list[dict]:
    """Per equal-width bin: its range, how many answers fell in it, their mean confidence and accuracy.
    A confidence of exactly 1 goes to the last bin."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    index = np.minimum((confidences * bins).astype(int), bins - 1)
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidences[members].mean()) if count else math.nan,
                "accuracy": float(correct[members].mean()) if count else math.nan,
            }
        )
    return table


def fit_temperature(token_logits: list[np.ndarray], correct, grid: np.ndarray = TEMPERATURE_GRID) -> float:
    """The T of `grid` whose sequence probabilities best predict correctness (binary cross-entropy);
    the smallest such T on ties. 1.0 when there is nothing to fit on."""
    correct = np.asarray(correct, dtype=np.float64)
    if len(token_logits) == 0 or correct.min() == correct.max():
        return 1.0  # all right or all wrong: any confidence order fits; do not move
    best, best_loss = 1.0, math.inf
    eps = 1e-12
    for temperature in grid:
        p = np.exp([sequence_logprob(logits, temperature) for logits in token_logits]).clip(eps, 1 - eps)
        loss = float(-(correct * np.log(p) + (1 - correct) * np.log(1 - p)).mean())
        if loss < best_loss - 1e-12:
            best, best_loss = float(temperature), loss
    return best


def majority_vote(answers: list[str]) -> str:
    """The most frequent non-empty answer; a tie goes to the answer that appeared first."""
    counted = Counter(answer for answer in answers if answer)
    if not counted:
        return ""
    top = max(counted.values())
    return next(answer for answer in answers if answer and counted[answer] == top)


def best_of_n(answers: list[str], scores: list[float]) -> str:
    """The answer with the highest score; a tie goes to the earlier sample."""
    if not answers:
        return ""
    best = max(range(len(answers)), key=lambda i: (scores[i], -i))
    return answers[best]


def curve(items: list[dict], ks: list[int], method: str) -> dict[int, float]:
    """Accuracy vs k over items {"sample_answers", "answer"[, "sample_rewards"]}, using each item's
    first k samples: `self_consistency` (majority vote) or `best_of_n` (highest reward)."""
    accuracy = {}
    for k in ks:
        hits = 0
        for item in items:
            answers = item["sample_answers"][:k]
            chosen = majority_vote(answers) if method == "self_consistency" else best_of_n(answers, item["sample_rewards"][:k])
            hits += chosen.strip() == item["answer"].strip()
        accuracy[k] = hits / len(items) if items else math.nan
    return accuracy


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (nan, nan) for no trials."""
    if total == 0:
        return math.nan, math.nan
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)  # clamped: float error at p = 0 or 1


def win_rate(scores: list[float], against: list[float]) -> float:
    """Fraction of items where `scores` beats `against`, ties counting half."""
    if not scores:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, against)) / len(scores)
