"""The metric functions on hand-made cases, with their expected values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from posttrain import metrics as m


def test_ece_of_a_known_example():
    # Bin [0.8, 0.9): confidences 0.8, 0.85, accuracy 1/2 -> |0.5 - 0.825| = 0.325, weight 2/4;
    # bin [0.3, 0.4): 0.3 right -> |1 - 0.3| = 0.7, weight 1/4; bin [0.9, 1]: 1.0 right -> 0, weight 1/4.
    ece = m.expected_calibration_error([0.8, 0.85, 0.3, 1.0], [True, False, True, True], bins=10)
    assert ece == pytest.approx(0.5 * 0.325 + 0.25 * 0.7 + 0.25 * 0.0)
    assert m.expected_calibration_error([0.9, 0.9], [True, False]) == pytest.approx(0.4)
    assert m.expected_calibration_error([0.25, 0.75], [False, True], bins=2) == pytest.approx(0.25)
    assert math.isnan(m.expected_calibration_error([], []))
    table = m.reliability_bins([0.05, 1.0], [False, True], bins=10)
    assert table[0]["count"] == 1 and table[9]["count"] == 1 and table[9]["accuracy"] == 1.0  # 1.0 lands in the last bin


def test_sequence_logprob_at_a_temperature():
    # One token, logits [2, 0] with the chosen first: p = e^2 / (e^2 + 1); at T = 2: e^1 / (e^1 + 1).
    logits = np.array([[2.0, 0.0]])
    assert m.sequence_logprob(logits) == pytest.approx(math.log(math.exp(2) / (math.exp(2) + 1)))
    assert m.sequence_logprob(logits, 2.0) == pytest.approx(math.log(math.e / (math.e + 1)))
    two = np.array([[2.0, 0.0], [0.0, 0.0]])  # the second token is a coin flip: log 0.5 more
    assert m.sequence_logprob(two) == pytest.approx(m.sequence_logprob(logits) + math.log(0.5))
    assert m.sequence_logprob(np.zeros((0, 4))) == 0.0


def test_temperature_fit_cools_an_overconfident_model_and_leaves_a_degenerate_split_alone():
    rng = np.random.default_rng(0)
    # Every reply is sure of itself (margin 6 per token) but only half are right: a T > 1 fits.
    token_logits = [np.array([[6.0, 0.0]]) for _ in range(40)]
    correct = [bool(rng.integers(2)) for _ in range(40)]
    temperature = m.fit_temperature(token_logits, correct)
    assert temperature > 2
    before = [math.exp(m.sequence_logprob(x)) for x in token_logits]
    after = [math.exp(m.sequence_logprob(x, temperature)) for x in token_logits]
    assert m.expected_calibration_error(after, correct) < m.expected_calibration_error(before, correct)
    # p_T = sigmoid(6 / T); the best constant prediction is the accuracy, so 6 / T ≈ logit(accuracy).
    accuracy = sum(correct) / len(correct)
    assert 1 / (1 + math.exp(-6 / temperature)) == pytest.approx(accuracy, abs=0.03)
    assert m.fit_temperature(token_logits, [True] * 40) == 1.0  # all right: nothing to fit


def test_majority_vote_breaks_ties_by_first_appearance():
    assert m.majority_vote(["4", "5", "4"]) == "4"
    assert m.majority_vote(["5", "4", "4", "5"]) == "5"  # tie: "5" came first
    assert m.majority_vote(["", "", "7"]) == "7"  # empty extractions do not vote
    assert m.majority_vote(["", ""]) == ""


def test_best_of_n_takes_the_highest_score_and_the_earliest_on_a_tie():
    assert m.best_of_n(["a", "b", "c"], [0.1, 0.9, 0.3]) == "b"
    assert m.best_of_n(["a", "b", "c"], [0.5, 0.5, 0.1]) == "a"
    assert m.best_of_n([], []) == ""


def test_curves_use_the_first_k_samples():
    items = [
        {"answer": "1", "sample_answers": ["2", "1", "1", "2"], "sample_rewards": [0.0, 1.0, 0.0, 0.0]},
        {"answer": "3", "sample_answers": ["3", "4", "4", "4"], "sample_rewards": [0.2, 0.1, 0.1, 0.1]},
    ]
    # k=1: "2" wrong, "3" right; k=2: tie 2/1 -> "2" (first) wrong, tie 3/4 -> "3" right; k=4: tie 2/1 -> "2", "4" wrong.
    assert m.curve(items, [1, 2, 4], "self_consistency") == {1: 0.5, 2: 0.5, 4: 0.0}
    # best-of-N: item 1 picks "1" from k=2 on, item 2 keeps "3" (highest reward) throughout.
    assert m.curve(items, [1, 2, 4], "best_of_n") == {1: 0.5, 2: 1.0, 4: 1.0}


def test_win_rate_counts_ties_half():
    assert m.win_rate([1.0, 0.0, 0.5], [0.0, 0.0, 1.0]) == pytest.approx((1 + 0.5 + 0) / 3)
    assert math.isnan(m.win_rate([], []))


def test_wilson_interval_of_a_known_proportion():
    from posttrain.metrics import wilson_interval

    low, high = wilson_interval(60, 100)  # p = 0.6: the textbook interval is (0.502, 0.691)
    assert (round(low, 3), round(high, 3)) == (0.502, 0.691)
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.35
