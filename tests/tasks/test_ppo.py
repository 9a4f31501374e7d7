"""PPO's pieces against numbers computed by hand, and GRPO's, the reward functions' and the
reward-hacking detector's on small cases."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.align.grpo import group_advantages, informative_groups, k3_kl
from tasks.align.hacking import detect
from tasks.align.ppo import AdaptiveKL, gae, kl_penalty_rewards, policy_loss, value_loss
from tasks.align.rewards import RewardContext, edit_distance, exact_match, partial_credit
from tasks.align.rollout import masked_whiten


def test_gae_on_a_three_step_reply_with_a_padded_fourth_position():
    # gamma 0.9, lambda 0.8; the reward arrives on the last reply token.
    #   t=2: delta = 1 - 0.7 = 0.3                      A = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03            A = 0.03 + 0.72*0.3 = 0.246
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04            A = 0.04 + 0.72*0.246 = 0.21712
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])  # the padded position's value must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages.tolist()[0] == pytest.approx([0.21712, 0.246, 0.3, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.71712, 0.846, 1.0, 0.0])


def test_whitening_uses_the_masked_entries_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # mean 2.5, unbiased variance 5/3
    expected = [(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3, 4)] + [0.0]
    assert masked_whiten(values, mask).tolist()[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "ratio, advantage, loss, clipped",
    [
        (1.1, 2.0, -2.2, 0.0),  # inside the range: the plain surrogate
        (1.5, 2.0, -2.4, 1.0),  # above 1 + eps with a positive advantage: clipped at 1.2
        (0.5, -1.0, 0.8, 1.0),  # below 1 - eps with a negative advantage: clipped at 0.8 (pessimistic)
        (1.5, -1.0, 1.5, 0.0),  # a negative advantage above the range stays unclipped
    ],
)
def test_clipped_policy_objective(ratio, advantage, loss, clipped):
    old = torch.tensor([[-1.0]])
    new = old + math.log(ratio)
    value, fraction = policy_loss(new, old, torch.tensor([[advantage]]), torch.ones(1, 1), clip=0.2)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert fraction.item() == clipped


def test_clipped_value_loss():
    mask = torch.ones(1, 1)
    # V moved 0.5 -> 1.0, clipped to 0.7; target 0.8: max((0.2)^2, (0.1)^2) / 2 = 0.02
    assert value_loss(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([[0.8]]), mask, 0.2).item() == pytest.approx(0.02)
    # V moved 0.5 -> 0.9, clipped to 0.7; target 1.2: max((0.3)^2, (0.5)^2) / 2 = 0.125
    assert value_loss(torch.tensor([[0.9]]), torch.tensor([[0.5]]), torch.tensor([[1.2]]), mask, 0.2).item() == pytest.approx(0.125)


def test_per_token_kl_penalty_and_the_score_on_the_last_reply_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.5, -0.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = kl_penalty_rewards(torch.tensor([2.0]), logp, ref, mask, beta=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.05, 2.0, 0.0])
    assert kl.tolist() == pytest.approx([0.0])


def test_adaptive_kl_controller_moves_beta_toward_the_target_and_a_fixed_one_does_not():
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert controller.update(9.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error 0.5 clipped to 0.2
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert controller.update(6.6, 100) == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    controller = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert controller.update(3.0, 100) == pytest.approx(0.1 * (1 - 0.2 * 100 / 10000))
    assert AdaptiveKL(0.1, target=None, horizon=10).update(50.0, 100) == 0.1


def test_grpo_group_advantages_and_which_groups_carry_signal():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    advantages = group_advantages(rewards, 4, scale=False)
    assert advantages.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0])
    scaled = group_advantages(rewards, 4, scale=True)
    assert scaled[0].item() == pytest.approx(0.75 / (0.5 + 1e-4))  # std of [1,0,0,0] (unbiased) = 0.5
    assert informative_groups(rewards, 4).tolist() == [True, False]


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -1.0, -2.0])
    ref = torch.tensor([-1.0, -2.0, -1.0])
    values = k3_kl(logp, ref)
    assert values[0].item() == 0.0
    assert values[1].item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert values[2].item() == pytest.approx(math.exp(1) - 1 - 1)


def test_reward_functions():
    rows = [{"prompt": "sort cyzsnc", "answer": "ccnsyz"}] * 3
    replies = ["ccnsyz", "ccnryz\nmore", ""]
    assert exact_match(rows, replies, RewardContext()) == [1.0, 0.0, 0.0]
    assert partial_credit(rows, replies, RewardContext()) == pytest.approx([1.0, 5 / 6, 0.0])
    assert edit_distance("kitten", "sitting") == 3
    with pytest.raises(ValueError, match="needs an `answer`"):
        exact_match([{"prompt": "hi"}], ["x"], RewardContext())


def test_hacking_detector_flags_a_rising_proxy_with_a_falling_gold_only():
    window = 5
    rising = [0.1 * i for i in range(30)]
    peak_then_fall = [0.5] * 10 + [0.6] * 5 + [0.3] * 15
    flagged = detect(rising, peak_then_fall, window, min_gold_drop=0.05)
    assert flagged["flag"] and flagged["gold_delta"] == pytest.approx(-0.3) and flagged["gold_best_window"] == 2
    assert not detect(rising, [0.1 * i for i in range(30)], window, 0.05)["flag"]  # both rise: learning
    falling_proxy = [3.0 - 0.1 * i for i in range(30)]
    assert not detect(falling_proxy, peak_then_fall, window, 0.05)["flag"]  # both fall: a bad run, not hacking
    assert not detect(rising, [0.5] * 10 + [0.48] * 20, window, 0.05)["flag"]  # within the tolerance
    assert not detect(rising[:4], peak_then_fall[:4], window, 0.05)["flag"]  # one window: nothing to compare
