"""GRPO / RLOO / DAPO / Dr. GRPO pieces against hand-worked numbers (float64).

Expected values are written out by hand or with plain-Python ``math``; padded positions hold
garbage (99) that must never matter.
"""

import math

import pytest
import torch

from preftune.losses import (
    AGGREGATIONS,
    LOSS_TYPE_ALIASES,
    aggregate_loss,
    combined_rewards,
    drop_zero_std_groups,
    frac_reward_zero_std,
    group_advantages,
    group_std,
    grpo_loss,
    overlong_penalty,
    rloo_advantages,
    sequence_kl,
    zero_std_groups,
)

G = 99.0  # garbage in padding


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected):
    torch.testing.assert_close(actual, t(expected), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- advantages

# three groups of G=3: [1, 2, 3] (mean 2, sample std 1), [0, 0, 3] (mean 1, deviations -1 -1 2,
# sample variance (1 + 1 + 4) / 2 = 3) and [5, 5, 5] (all equal)
REWARDS = [1.0, 2.0, 3.0, 0.0, 0.0, 3.0, 5.0, 5.0, 5.0]
CENTRED = [-1.0, 0.0, 1.0, -1.0, -1.0, 2.0, 0.0, 0.0, 0.0]


def test_group_scaling_divides_by_each_groups_sample_std():
    s3 = math.sqrt(3.0)
    close(group_std(t(REWARDS), 3), [1.0, s3, 0.0])
    close(group_advantages(t(REWARDS), 3, "group", eps=0.0)[:6], [-1.0, 0.0, 1.0, -1 / s3, -1 / s3, 2 / s3])
    # the default eps 1e-4 sits in the denominator; the all-equal group gets 0, not 0/0
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, -1 / (s3 + 1e-4), -1 / (s3 + 1e-4), 2 / (s3 + 1e-4), 0.0, 0.0, 0.0]
    close(group_advantages(t(REWARDS), 3), expected)


def test_batch_scaling_keeps_the_group_mean_and_divides_by_the_batch_std():
    # batch mean 24/9 = 8/3; sum of squares 98; 98 - 9 * (8/3)^2 = 34; sample variance 34 / 8 = 4.25
    std = math.sqrt(4.25)
    close(group_advantages(t(REWARDS), 3, "batch", eps=0.0), [c / std for c in CENTRED])
    close(group_advantages(t(REWARDS), 3, "batch"), [c / (std + 1e-4) for c in CENTRED])


def test_no_scaling_is_dr_grpo_reward_minus_group_mean():
    close(group_advantages(t(REWARDS), 3, "none"), CENTRED)


def test_rloo_baseline_is_the_mean_of_the_other_samples_with_kl_folded_in():
    rewards, kl = [1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 1.0], [0.5, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 4.0]
    # beta 0.5: shaped R = r - 0.5 kl = [0.75, 1.5, 3.0, 5.0] and [0.0, 1.0, 0.0, -1.0]
    # group 1: A_0 = 0.75 - (1.5 + 3 + 5) / 3 = 0.75 - 9.5/3 = -29/12
    #          A_1 = 1.5 - 8.75/3 = -17/12,  A_2 = 3 - 7.25/3 = 7/12,  A_3 = 5 - 5.25/3 = 39/12
    # group 2: A = [0 - 0/3, 1 - (-1)/3, 0 - 0/3, -1 - 1/3] = [0, 4/3, 0, -4/3]
    expected = [-29 / 12, -17 / 12, 7 / 12, 39 / 12, 0.0, 4 / 3, 0.0, -4 / 3]
    close(rloo_advantages(t(rewards), t(kl), beta=0.5, group_size=4), expected)
    # without the KL: group 1 R = [1, 2, 3, 6] -> A_i = r_i - (12 - r_i)/3 = (4 r_i - 12) / 3
    close(rloo_advantages(t(rewards), t(kl), beta=0.0, group_size=4)[:4], [-8 / 3, -4 / 3, 0.0, 4.0])
    # leave-one-out advantages equal G/(G-1) times the group-centred ones: they sum to 0 per group
    assert rloo_advantages(t(rewards), t(kl), 0.5, 4).view(2, 4).sum(1).abs().max().item() < 1e-12


def test_sequence_kl_sums_the_per_token_estimate_over_completion_tokens():
    logps, ref = t([[-1.0, -2.0, G], [-0.5, G, G]]), t([[-1.5, -1.0, -G], [-0.5, G, -G]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    close(sequence_kl(logps, ref, mask), [0.5 + (-1.0), 0.0])
    k3 = lambda log_ratio: math.exp(-log_ratio) + log_ratio - 1  # noqa: E731
    close(sequence_kl(logps, ref, mask, "k3"), [k3(0.5) + k3(-1.0), 0.0])


def test_weighted_sum_of_reward_functions_with_and_without_per_reward_normalisation():
    # two groups of 2; function 1 gives [1, 3 | 0, 0], function 2 gives [10, 30 | 5, 15]
    rewards = t([[1.0, 10.0], [3.0, 30.0], [0.0, 5.0], [0.0, 15.0]])
    close(combined_rewards(rewards), [11.0, 33.0, 5.0, 15.0])
    close(combined_rewards(rewards, t([2.0, 0.5])), [7.0, 21.0, 2.5, 7.5])
    # normalised per function and group: deviations +-1, +-10, +-5 over sample stds sqrt(2), 10 sqrt(2), 5 sqrt(2)
    a, b, c = 1 / (math.sqrt(2) + 1e-4), 10 / (10 * math.sqrt(2) + 1e-4), 5 / (5 * math.sqrt(2) + 1e-4)
    close(combined_rewards(rewards, t([2.0, 0.5]), group_size=2, normalize=True),
          [-2 * a - 0.5 * b, 2 * a + 0.5 * b, -0.5 * c, 0.5 * c])
    with pytest.raises(ValueError, match="3 reward weights for 2"):
        combined_rewards(rewards, t([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="group size"):
        combined_rewards(rewards, normalize=True)


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(t([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(t([1.0, 2.0, 3.0, 4.0]), 3)
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(t(REWARDS), 3, "global")
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(t([1.0]), t([0.0]), 0.1, 1)


# ---------------------------------------------------------------------- dynamic sampling, overlong


def test_groups_with_equal_rewards_are_found_counted_and_dropped():
    rewards = t([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.5])
    assert zero_std_groups(rewards, 3).tolist() == [True, False, True, False]
    assert frac_reward_zero_std(rewards, 3).item() == 0.5
    ids = torch.arange(12) * 10
    kept_rewards, kept_ids = drop_zero_std_groups(rewards, 3, ids)
    close(kept_rewards, [0.0, 1.0, 0.0, 3.0, 3.0, 3.5])
    assert kept_ids.tolist() == [30, 40, 50, 90, 100, 110]
    assert frac_reward_zero_std(t([0.0, 1.0, 1.0, 0.0]), 2).item() == 0.0
    # equal within atol (default 1e-8) counts as equal; atol 0 asks for exact equality
    nearly = t([1.0, 1.0 + 1e-10, 2.0, 2.0])
    assert zero_std_groups(nearly, 2).tolist() == [True, True]
    assert zero_std_groups(nearly, 2, atol=0.0).tolist() == [False, True]
    with pytest.raises(ValueError, match="does not match"):
        drop_zero_std_groups(rewards, 3, ids[:6])


def test_soft_overlong_punishment_by_hand():
    # L = 10, cache 4: free up to 6 tokens, then -1/4 per token, -1 at and beyond the limit
    penalty = overlong_penalty(torch.tensor([3, 6, 7, 9, 10, 12]), max_completion_length=10, overlong_cache=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0]))
    close(overlong_penalty(t([8.0]), 10, 4), [-0.5])
    with pytest.raises(ValueError, match="overlong_cache"):
        overlong_penalty(torch.tensor([3]), 10, 0)


# ---------------------------------------------------------------------- aggregation

PER_TOKEN = [[1.0, 2.0, 3.0, G], [4.0, G, G, G], [G, G, G, G]]
PER_TOKEN_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


def test_each_aggregation_by_hand():
    x = t(PER_TOKEN)
    assert aggregate_loss(x, PER_TOKEN_MASK, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    # per-sequence means 2, 4 and (no tokens) 0, over all three rows
    assert aggregate_loss(x, PER_TOKEN_MASK, "sequence_mean").item() == pytest.approx((2 + 4 + 0) / 3)
    assert aggregate_loss(x, PER_TOKEN_MASK, "constant", max_completion_length=5).item() == pytest.approx(10 / (3 * 5))
    assert aggregate_loss(x, PER_TOKEN_MASK, "token_mean", num_tokens=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_loss(x, PER_TOKEN_MASK, "constant")
    with pytest.raises(ValueError, match="token_mean, sequence_mean, constant"):
        aggregate_loss(x, PER_TOKEN_MASK, "sum")
    assert set(LOSS_TYPE_ALIASES.values()) == set(AGGREGATIONS)


def test_token_mean_over_micro_batches_with_a_global_token_count_equals_one_big_batch():
    x = t(PER_TOKEN)
    whole = aggregate_loss(x, PER_TOKEN_MASK, "token_mean")
    # two micro-batches averaged (as gradient accumulation does): each divides by total tokens / 2
    parts = [aggregate_loss(x[rows], PER_TOKEN_MASK[rows], "token_mean", num_tokens=4 / 2) for rows in ([0], [1, 2])]
    assert ((parts[0] + parts[1]) / 2).item() == pytest.approx(whole.item())
    # while the plain mean of per-micro-batch token means is not the token mean: (2 + 4) / 2 = 3 != 2.5
    plain = [aggregate_loss(x[rows], PER_TOKEN_MASK[rows], "token_mean") for rows in ([0], [1, 2])]
    assert ((plain[0] + plain[1]) / 2).item() == pytest.approx(3.0)


# ---------------------------------------------------------------------- the clipped loss

# log-ratios log(π/π_old) per token; A = +1, -0.5, +2 per sequence; ε_low 0.2, ε_high 0.28 (DAPO)
LOG_RATIO = [[0.1, -0.2, math.log(1.25), 0.3, math.log(0.7)], [0.2, math.log(0.7), math.log(1.35), G, G],
             [0.0, G, G, G, G]]
NEW = [[-1.0, -2.0, -0.5, -1.5, -0.8], [-0.3, -0.7, -1.1, G, G], [-0.4, G, G, G, G]]
ADV = [1.0, -0.5, 2.0]
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
# per token -min(ρA, clip(ρ, 0.8, 1.28)·A):
#   A=+1:   ρ = e^0.1 and e^-0.2 inside; 1.25 inside [0.8, 1.28] (would be clipped at 1.2 with ε 0.2);
#           e^0.3 = 1.3499 clipped to 1.28 (high); 0.7 below 0.8 but A > 0, so min keeps 0.7 (not clipped)
#   A=-0.5: e^0.2 = 1.2214 inside; 0.7 clipped to 0.8 (low): -min(-0.35, -0.4) = 0.4;
#           1.35 with A < 0: -min(-0.675, -0.64) = 0.675 (no upper clip for negative advantages)
#   A=+2:   ρ = 1: -2
PER_TOKEN_EXPECTED = [[-math.exp(0.1), -math.exp(-0.2), -1.25, -1.28, -0.7],
                      [0.5 * math.exp(0.2), 0.4, 0.675], [-2.0]]


def old_logps():
    return t([[n - r for n, r in zip(rn, rr)] for rn, rr in zip(NEW, LOG_RATIO)])


def run(aggregation="token_mean", **kwargs):
    kwargs = {"epsilon_low": 0.2, "epsilon_high": 0.28, "old_logps": old_logps(), **kwargs}
    return grpo_loss(t(NEW), t(ADV), MASK, aggregation=aggregation, **kwargs)


def test_clipped_loss_under_each_aggregation_by_hand():
    rows = PER_TOKEN_EXPECTED
    total = sum(sum(r) for r in rows)
    assert run("token_mean").loss.item() == pytest.approx(total / 9, rel=1e-12)
    assert run("sequence_mean").loss.item() == pytest.approx(sum(sum(r) / len(r) for r in rows) / 3, rel=1e-12)
    assert run("constant", max_completion_length=8).loss.item() == pytest.approx(total / (3 * 8), rel=1e-12)
    out = run()
    assert out.clip_low.item() == pytest.approx(1 / 9)
    assert out.clip_high.item() == pytest.approx(1 / 9)
    assert out.clip_region.item() == pytest.approx(2 / 9)
    assert out.kl is None and set(out.metrics()) == {"clip_ratio/low_mean", "clip_ratio/high_mean",
                                                     "clip_ratio/region_mean"}
    # per-token advantages give the same loss as per-sequence ones
    per_token_adv = t(ADV)[:, None].expand(3, 5)
    assert grpo_loss(t(NEW), per_token_adv, MASK, old_logps=old_logps(), epsilon_high=0.28).loss.item() == \
        pytest.approx(out.loss.item(), rel=1e-12)


def test_clip_higher_leaves_ratios_between_the_two_bounds_unclipped_for_positive_advantages():
    # ε_high = ε_low = 0.2: ratio 1.25 with A = +1 is now clipped to 1.2, and counted as clipped high
    symmetric = grpo_loss(t(NEW), t(ADV), MASK, old_logps=old_logps(), epsilon_low=0.2)
    rows = [list(r) for r in PER_TOKEN_EXPECTED]
    rows[0][2], rows[0][3] = -1.2, -1.2
    assert symmetric.loss.item() == pytest.approx(sum(sum(r) for r in rows) / 9, rel=1e-12)
    assert symmetric.clip_high.item() == pytest.approx(2 / 9)
    # gradients: a clipped token gets none; 1.25 under clip-higher keeps -A·ρ / 9
    new = t(NEW).requires_grad_()
    grpo_loss(new, t(ADV), MASK, old_logps=old_logps(), epsilon_low=0.2, epsilon_high=0.28).loss.backward()
    assert new.grad[0, 2].item() == pytest.approx(-1.25 / 9)
    assert new.grad[0, 3].item() == 0.0                      # clipped high
    assert new.grad[0, 4].item() == pytest.approx(-0.7 / 9)  # ρ < 1-ε but A > 0: the gradient stays
    assert new.grad[1, 1].item() == 0.0                      # clipped low
    assert new.grad[1, 2].item() == pytest.approx(0.5 * 1.35 / 9)
    assert new.grad[1, 3:].abs().sum().item() == 0.0         # padding
    new = t(NEW).requires_grad_()
    grpo_loss(new, t(ADV), MASK, old_logps=old_logps(), epsilon_low=0.2).loss.backward()
    assert new.grad[0, 2].item() == 0.0


def test_on_policy_loss_is_minus_the_mean_advantage_with_gradient_minus_a():
    new = t(NEW).requires_grad_()
    out = grpo_loss(new, t(ADV), MASK)
    assert out.loss.item() == pytest.approx(-(5 * 1.0 + 3 * -0.5 + 2.0) / 9)
    out.loss.backward()
    expected = [[-1 / 9] * 5, [0.5 / 9] * 3 + [0.0, 0.0], [-2 / 9] + [0.0] * 4]
    close(new.grad, expected)
    assert out.clip_region.item() == 0.0


def test_k3_kl_term_and_statistic():
    ref = t([[-1.5, -1.0, -0.5, -1.0, -0.8], [-0.3, -0.2, -1.0, G, G], [-1.4, G, G, G, G]])
    k3 = [[math.exp(r - n) - (r - n) - 1 for r, n in zip(rr, rn)] for rr, rn in zip(ref.tolist(), NEW)]
    k3 = [k3[0], k3[1][:3], k3[2][:1]]
    assert k3[0][0] == pytest.approx(0.1065307, abs=1e-6)  # e^-0.5 + 0.5 - 1
    mean_kl = sum(sum(r) for r in k3) / 9
    out = run(ref_logps=ref, beta=0.1)
    rows = [[a + 0.1 * b for a, b in zip(ra, rb)] for ra, rb in zip(PER_TOKEN_EXPECTED, k3)]
    assert out.loss.item() == pytest.approx(sum(sum(r) for r in rows) / 9, rel=1e-12)
    assert out.kl.item() == pytest.approx(mean_kl, rel=1e-12)
    assert out.metrics()["kl"].item() == pytest.approx(mean_kl, rel=1e-12)
    seq = run("sequence_mean", ref_logps=ref, beta=0.1)
    assert seq.loss.item() == pytest.approx(sum(sum(r) / len(r) for r in rows) / 3, rel=1e-12)
    # beta 0: the reference is only reported, never in the loss
    report_only = run(ref_logps=ref, beta=0.0)
    assert report_only.loss.item() == pytest.approx(run().loss.item(), rel=1e-12)
    assert report_only.kl.item() == pytest.approx(mean_kl, rel=1e-12)
    with pytest.raises(ValueError, match="ref_logps"):
        run(beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        run(ref_logps=ref, beta=-0.1)


def test_truncated_completions_leave_the_loss():
    truncated = torch.tensor([False, False, True])
    rows = PER_TOKEN_EXPECTED
    out = run(truncated=truncated)
    assert out.loss.item() == pytest.approx((sum(rows[0]) + sum(rows[1])) / 8, rel=1e-12)
    assert out.clip_low.item() == pytest.approx(1 / 8)
    # sequence_mean and constant keep the batch size in the denominator
    assert run("sequence_mean", truncated=truncated).loss.item() == pytest.approx(
        (sum(rows[0]) / 5 + sum(rows[1]) / 3) / 3, rel=1e-12)
    assert run("constant", max_completion_length=8, truncated=truncated).loss.item() == pytest.approx(
        (sum(rows[0]) + sum(rows[1])) / 24, rel=1e-12)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_gradcheck(aggregation):
    ref = t([[-1.5, -1.0, -0.5, -1.0, -0.8], [-0.3, -0.2, -1.0, G, G], [-1.4, G, G, G, G]])
    old = old_logps()

    def loss(logps):
        return grpo_loss(logps, t(ADV), MASK, old_logps=old, ref_logps=ref, beta=0.1, epsilon_high=0.28,
                         aggregation=aggregation, max_completion_length=8).loss

    assert torch.autograd.gradcheck(loss, (t(NEW).requires_grad_(),), eps=1e-6, atol=1e-8)


def test_the_config_offers_exactly_the_names_the_losses_accept():
    from preftune.config import grpo as settings
    from preftune.losses import grpo as losses

    assert settings.SCALE_REWARDS == losses.SCALE_REWARDS and settings.AGGREGATIONS == losses.AGGREGATIONS
    assert settings.LOSS_TYPE_ALIASES == losses.LOSS_TYPE_ALIASES
