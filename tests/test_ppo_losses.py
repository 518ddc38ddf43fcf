"""PPO pieces against hand-worked numbers. Padded positions hold garbage (99) that must never matter."""

import math
import random

import pytest
import torch

from preftune.losses.ppo import (
    adaptive_kl_coef,
    explained_variance,
    gae_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

G = 99.0  # garbage in padding


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_by_hand():
    # row 0: three tokens then padding; row 1: one token. gamma 0.9, lambda 0.8 (gamma*lambda = 0.72)
    rewards = t([[0.1, -0.2, 1.0, G], [2.0, G, G, G]])
    values = t([[0.5, 0.4, 0.3, G], [0.5, G, G, G]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: d = 1.0 + 0.9*0 - 0.3 = 0.7                   A2 = 0.7
    # t=1: d = -0.2 + 0.9*0.3 - 0.4 = -0.33              A1 = -0.33 + 0.72*0.7 = 0.174
    # t=0: d = 0.1 + 0.9*0.4 - 0.5 = -0.04               A0 = -0.04 + 0.72*0.174 = 0.08528
    # row 1: d = 2.0 - 0.5 = 1.5
    torch.testing.assert_close(advantages, t([[0.08528, 0.174, 0.7, 0], [1.5, 0, 0, 0]]))
    torch.testing.assert_close(returns, t([[0.58528, 0.574, 1.0, 0], [2.0, 0, 0, 0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = t([[0.0, -0.1, 3.0]])
    values = t([[1.0, 2.0, 0.5]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, t([[2.9, 2.9, 3.0]]))
    torch.testing.assert_close(advantages, t([[1.9, 0.9, 2.5]]))


def test_clipped_policy_loss_by_hand():
    new = t([[-1.0, -2.0, -0.5, G]])
    old = t([[-1.2, -1.5, -0.5, -G]])
    adv = t([[1.0, -2.0, 0.5, G]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    out = policy_loss(new, old, adv, mask, cliprange=0.2)
    # ratios e^0.2 = 1.2214, e^-0.5 = 0.6065, 1
    # token 0 (A=1):  max(-1.2214, -1.2) = -1.2        clipped term chosen
    # token 1 (A=-2): max(1.2131, 1.6) = 1.6           clipped term chosen
    # token 2:        -0.5
    assert out.loss.item() == pytest.approx((-1.2 + 1.6 - 0.5) / 3)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    assert out.approxkl.item() == pytest.approx(0.5 * (0.04 + 0.25 + 0.0) / 3)


def test_policy_loss_gradient_is_zero_where_clipped():
    new = t([[-1.0, -2.0]]).requires_grad_()
    out = policy_loss(new, t([[-1.2, -2.0]]), t([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.bool), cliprange=0.1)
    out.loss.backward()
    assert new.grad[0, 0].item() == 0.0          # ratio 1.22 > 1.1 with A > 0: no incentive to go further
    assert new.grad[0, 1].item() == pytest.approx(-0.5)  # d/dlogp of -A*ratio/2 at ratio 1


def test_clipped_value_loss_by_hand():
    values, old, returns = t([[0.5, 1.0, G]]), t([[0.2, 0.9, G]]), t([[1.0, 0.0, -G]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: clipped value 0.2 + 0.2 = 0.4, errors 0.25 (plain) and 0.36 (clipped) -> 0.36
    # token 1: clipped value 0.9 + 0.1 = 1.0, both errors 1.0 -> 1.0
    assert loss.item() == pytest.approx(0.5 * (0.36 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)


def test_kl_estimators_by_hand():
    logps, ref = t([-1.0, -2.0, -0.3]), t([-1.5, -1.0, -0.3])
    torch.testing.assert_close(kl_penalty(logps, ref, "k1"), t([0.5, -1.0, 0.0]))
    # k3 = (r - 1) - log r, r = pi_ref / pi
    r = [math.exp(-0.5), math.exp(1.0), 1.0]
    torch.testing.assert_close(kl_penalty(logps, ref, "k3"), t([(x - 1) - math.log(x) for x in r]))
    assert kl_penalty(logps, ref, "k3")[0].item() == pytest.approx(0.1065307, abs=1e-6)
    assert (kl_penalty(t([-3.0, 0.0]), t([0.0, -3.0]), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(logps, ref, "k2")


def test_masked_statistics_and_whitening_by_hand():
    values = t([[1.0, 2.0, 3.0, G]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)               # (1 + 0 + 1) / (3 - 1)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_whiten(values, mask), t([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), t([[1.0, 2.0, 3.0, 0.0]]), atol=1e-7,
                               rtol=0)


def test_score_goes_on_the_last_response_token():
    kl = t([[0.1, 0.2, 0.3], [0.5, G, G]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    rewards = token_rewards(t([2.0, -1.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, t([[-0.05, -0.1, -0.15 + 2.0], [-0.25 - 1.0, 0.0, 0.0]]))


def test_explained_variance_by_hand():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # Var(R) = 2/3, Var(R - V) = Var([0, 0, 1]) = 2/9  ->  1 - (2/9)/(2/3) = 2/3
    assert explained_variance(t([[1.0, 2.0, 2.0, G]]), t([[1.0, 2.0, 3.0, G]]), mask) == pytest.approx(2 / 3)


def test_adaptive_kl_step_by_hand():
    # error = clip(9/6 - 1, -0.2, 0.2) = 0.2;  0.1 * (1 + 0.2 * 64/640) = 0.102
    assert adaptive_kl_coef(0.1, 9.0, 6.0, n_steps=64, horizon=640) == pytest.approx(0.102)
    # error = 5.4/6 - 1 = -0.1;  0.1 * (1 - 0.1 * 0.1) = 0.099
    assert adaptive_kl_coef(0.1, 5.4, 6.0, n_steps=64, horizon=640) == pytest.approx(0.099)
    assert adaptive_kl_coef(0.1, float("nan"), 6.0, 64, 640) == 0.1


def test_adaptive_controller_keeps_kl_near_target_in_closed_loop():
    """A policy whose KL to the reference shrinks as the penalty grows (KL = 0.6 / beta, noisy)."""
    rng = random.Random(0)
    beta, target, history = 0.02, 6.0, []
    for _ in range(400):
        kl = 0.6 / beta * (1 + 0.3 * rng.uniform(-1, 1))
        history.append(kl)
        beta = adaptive_kl_coef(beta, kl, target, n_steps=64, horizon=1000)
    assert history[0] > 4 * target                       # starts far above the target
    late = history[-150:]
    assert abs(sum(late) / len(late) / target - 1) < 0.1  # and settles around it
    assert beta == pytest.approx(0.6 / target, rel=0.15)


def test_value_clip_fraction_counts_no_token_inside_the_range():
    # values within ε of the old values, drawn independently so that old + (v - old) rounds away from v
    g = torch.Generator().manual_seed(0)
    old, values = torch.randn(1, 100_000, generator=g) * 3, torch.randn(1, 100_000, generator=g) * 3
    keep = (values - old).abs() < 0.2
    old, values = old[keep][None], values[keep][None]
    returns = torch.randn(old.shape, generator=g) * 3
    assert bool((old + (values - old) != values).any())          # the rounding the old formula tripped on
    mask = torch.ones_like(old, dtype=torch.bool)
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert clipfrac.item() == 0.0
    assert loss.item() == pytest.approx(0.5 * ((values - returns) ** 2).mean().item(), rel=1e-6)
