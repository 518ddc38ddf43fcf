"""Reward losses against hand-computed float64 values, their gradients, and the batch total."""

import math

import pytest
import torch

from preftune.errors import ConfigError
from preftune.losses import (
    REWARD_LOSSES,
    bradley_terry_loss,
    centering_penalty,
    ranking_loss,
    reward_loss,
    soft_label_loss,
)

CHOSEN = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
REJECTED = torch.tensor([0.0, 0.5, 2.5], dtype=torch.float64)   # Δ = [1.0, -1.0, -0.5]


def neg_log_sigmoid(z: float) -> float:
    return math.log(1.0 + math.exp(-z))


def test_bradley_terry_matches_hand_computed_values():
    expected = [neg_log_sigmoid(1.0), neg_log_sigmoid(-1.0), neg_log_sigmoid(-0.5)]
    torch.testing.assert_close(bradley_terry_loss(CHOSEN, REJECTED), torch.tensor(expected, dtype=torch.float64))
    # per-row margin m: -log σ(Δ - m)
    margin = torch.tensor([0.5, 0.0, -1.0], dtype=torch.float64)
    expected = [neg_log_sigmoid(0.5), neg_log_sigmoid(-1.0), neg_log_sigmoid(0.5)]
    torch.testing.assert_close(bradley_terry_loss(CHOSEN, REJECTED, margin),
                               torch.tensor(expected, dtype=torch.float64))
    assert neg_log_sigmoid(0.0) == pytest.approx(math.log(2))
    assert float(bradley_terry_loss(torch.tensor([0.3]), torch.tensor([0.3]))) == pytest.approx(math.log(2))


def test_ranking_loss_is_margin_ranking_loss():
    # relu(1 - Δ) with Δ = [1.0, -1.0, -0.5]
    torch.testing.assert_close(ranking_loss(CHOSEN, REJECTED), torch.tensor([0.0, 2.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(ranking_loss(CHOSEN, REJECTED, margin=0.25),
                               torch.tensor([0.0, 1.25, 0.75], dtype=torch.float64))
    reference = torch.nn.MarginRankingLoss(margin=1.0)(CHOSEN, REJECTED, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(ranking_loss(CHOSEN, REJECTED).mean(), reference)


def test_soft_label_loss_matches_hand_computed_values():
    p = torch.tensor([1.0, 0.7, 0.5], dtype=torch.float64)
    expected = [neg_log_sigmoid(1.0),
                0.7 * neg_log_sigmoid(-1.0) + 0.3 * neg_log_sigmoid(1.0),
                0.5 * neg_log_sigmoid(-0.5) + 0.5 * neg_log_sigmoid(0.5)]
    torch.testing.assert_close(soft_label_loss(CHOSEN, REJECTED, p), torch.tensor(expected, dtype=torch.float64))
    # p = 1 is Bradley-Terry; the margin enters the same way
    margin = torch.tensor([0.2, 0.4, 0.0], dtype=torch.float64)
    torch.testing.assert_close(soft_label_loss(CHOSEN, REJECTED, torch.ones(3, dtype=torch.float64), margin),
                               bradley_terry_loss(CHOSEN, REJECTED, margin))
    # its minimum over Δ is where σ(Δ) = p
    delta = torch.tensor([math.log(0.7 / 0.3)], dtype=torch.float64, requires_grad=True)
    prob = torch.tensor([0.7], dtype=torch.float64)
    soft_label_loss(delta, torch.zeros(1, dtype=torch.float64), prob).sum().backward()
    assert abs(float(delta.grad)) < 1e-12


def test_centering_penalty_and_total():
    torch.testing.assert_close(centering_penalty(CHOSEN, REJECTED),
                               torch.tensor([1.0, 0.0, 20.25], dtype=torch.float64))
    total, metrics = reward_loss("bradley_terry", CHOSEN, REJECTED, centering_coef=0.1)
    bt = (neg_log_sigmoid(1.0) + neg_log_sigmoid(-1.0) + neg_log_sigmoid(-0.5)) / 3
    assert float(total) == pytest.approx(bt + 0.1 * (1.0 + 0.0 + 20.25) / 3, rel=1e-12)
    assert float(metrics["loss/centering"]) == pytest.approx(21.25 / 3)
    assert float(metrics["accuracy"]) == pytest.approx(1 / 3)
    assert float(metrics["margin"]) == pytest.approx(-0.5 / 3)
    assert float(metrics["rewards/chosen"]) == pytest.approx(2.5 / 3)
    assert float(metrics["rewards/rejected"]) == pytest.approx(1.0)
    # the ranking loss needs a gap of margin + the row's margin
    total, _ = reward_loss("ranking", CHOSEN, REJECTED, ranking_margin=0.5,
                           margin=torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert float(total) == pytest.approx((0.5 + 1.5 + 1.0) / 3)
    total, _ = reward_loss("soft_label", CHOSEN, REJECTED, preference_prob=torch.full((3,), 0.5, dtype=torch.float64))
    symmetric = [0.5 * neg_log_sigmoid(d) + 0.5 * neg_log_sigmoid(-d) for d in (1, -1, -0.5)]
    assert float(total) == pytest.approx(sum(symmetric) / 3)


def test_unknown_loss_names_the_valid_ones():
    with pytest.raises(ConfigError, match="bradley_terry, ranking, soft_label"):
        reward_loss("hinge", CHOSEN, REJECTED)
    assert set(REWARD_LOSSES) == {"bradley_terry", "ranking", "soft_label"}


@pytest.mark.parametrize("name", ["bradley_terry", "ranking", "soft_label", "centering"])
def test_gradients_pass_gradcheck(name):
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randn(5, dtype=torch.float64, generator=generator).requires_grad_()
    rejected = torch.randn(5, dtype=torch.float64, generator=generator).requires_grad_()
    margin = torch.rand(5, dtype=torch.float64, generator=generator)
    p = torch.rand(5, dtype=torch.float64, generator=generator)
    functions = {
        "bradley_terry": lambda c, r: bradley_terry_loss(c, r, margin),
        "ranking": lambda c, r: ranking_loss(c, r, 1.0),
        "soft_label": lambda c, r: soft_label_loss(c, r, p, margin),
        "centering": centering_penalty,
    }
    if name == "ranking":  # keep away from the hinge's kink, where the loss is not differentiable
        assert bool(((1.0 - (chosen - rejected)).abs() > 1e-3).all())
    assert torch.autograd.gradcheck(functions[name], (chosen, rejected))


def test_eos_penalized_lowers_only_the_unfinished_scores():
    from preftune.losses.reward import eos_penalized

    got = eos_penalized([1.0, 0.25, -0.5], [True, False, False], 0.75)
    assert got.tolist() == [1.0, 0.25 - 0.75, -0.5 - 0.75] and got.dtype == torch.float64
    tensor = eos_penalized(torch.tensor([2.0, 2.0], dtype=torch.float32), torch.tensor([False, True]), 1.5)
    assert tensor.tolist() == [0.5, 2.0] and tensor.dtype == torch.float32
