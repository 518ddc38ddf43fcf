"""KTO loss against an independent float64 computation with plain math, and gradcheck."""

import math

import pytest
import torch

from preftune.losses import kto_loss, kto_metrics

POLICY = [-4.0, -6.5, -3.2, -8.0, -5.1]
REF = [-4.5, -6.0, -3.0, -9.0, -5.0]
KL_POLICY = [-7.0, -5.5, -9.25, -6.0]
KL_REF = [-7.8, -5.0, -10.0, -6.5]


def by_hand(policy, ref, desirable, beta, kl_policy=None, kl_ref=None, wd=1.0, wu=1.0):
    """One float at a time, with math.exp: the formula of Ethayarajh et al. 2024."""
    z0 = 0.0
    if kl_policy is not None:
        z0 = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_ref)) / len(kl_policy))
    def sigmoid(v):
        return 1.0 / (1.0 + math.exp(-v))

    losses = []
    for p, r, good in zip(policy, ref, desirable):
        ratio = p - r
        losses.append(wd * (1 - sigmoid(beta * (ratio - z0))) if good else wu * (1 - sigmoid(beta * (z0 - ratio))))
    return losses, z0


def run(desirable, beta=0.3, kl=True, wd=1.0, wu=1.0, kl_policy=KL_POLICY, kl_ref=KL_REF):
    def t(v):
        return torch.tensor(v, dtype=torch.float64)

    kl_ratios = t(kl_policy) - t(kl_ref) if kl else None
    return kto_loss(t(POLICY), t(REF), torch.tensor(desirable), beta, kl_logratios=kl_ratios,
                    desirable_weight=wd, undesirable_weight=wu)


CASES = {
    "desirable only": [True] * 5,
    "undesirable only": [False] * 5,
    "mixed": [True, False, True, False, False],
}


@pytest.mark.parametrize("kl", [True, False], ids=["with KL", "without KL"])
@pytest.mark.parametrize("name", list(CASES))
def test_kto_matches_float64_by_hand(name, kl):
    desirable = CASES[name]
    out = run(desirable, beta=0.3, kl=kl, wd=1.5, wu=0.8)
    expected, z0 = by_hand(POLICY, REF, desirable, 0.3, KL_POLICY if kl else None, KL_REF, wd=1.5, wu=0.8)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(out.z0) == pytest.approx(z0, abs=1e-12)
    assert float(out.z0) == (pytest.approx(0.3875) if kl else 0.0)  # mean of (0.8, -0.5, 0.75, 0.5)
    assert out.rewards.tolist() == pytest.approx([0.3 * (p - r) for p, r in zip(POLICY, REF)], rel=1e-12)


def test_reference_point_is_clamped_at_zero():
    out = run(CASES["mixed"], kl_policy=[-8.0, -6.0], kl_ref=[-7.0, -5.5])  # mean log-ratio -0.75
    assert float(out.z0) == 0.0
    expected, _ = by_hand(POLICY, REF, CASES["mixed"], 0.3)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_reference_point_carries_no_gradient():
    kl_policy = torch.tensor(KL_POLICY, dtype=torch.float64, requires_grad=True)
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, torch.tensor(REF, dtype=torch.float64), torch.tensor(CASES["mixed"]), 0.3,
                   kl_logratios=kl_policy - torch.tensor(KL_REF, dtype=torch.float64))
    out.losses.sum().backward()
    assert kl_policy.grad is None and policy.grad is not None


@pytest.mark.parametrize("kl", [True, False])
def test_gradcheck(kl):
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(REF, dtype=torch.float64)
    kl_ratios = torch.tensor(KL_POLICY, dtype=torch.float64) - torch.tensor(KL_REF, dtype=torch.float64) if kl else None
    desirable = torch.tensor(CASES["mixed"])

    def f(p):
        return kto_loss(p, ref, desirable, 0.7, kl_logratios=kl_ratios, desirable_weight=1.3,
                        undesirable_weight=0.6).losses

    assert torch.autograd.gradcheck(f, (policy,))
    # and the analytic derivative: d/dr λ(1 - σ(β(±(r - z0)))) = ∓λβσ(1-σ)
    f(policy).sum().backward()
    _, z0 = by_hand(POLICY, REF, CASES["mixed"], 0.7, KL_POLICY if kl else None, KL_REF)
    for g, p, r, good in zip(policy.grad.tolist(), POLICY, REF, CASES["mixed"]):
        s = 1 / (1 + math.exp(-0.7 * (p - r - z0)))
        expected = -1.3 * 0.7 * s * (1 - s) if good else 0.6 * 0.7 * s * (1 - s)
        assert g == pytest.approx(expected, rel=1e-10)


def test_metrics_are_means_over_each_kind():
    desirable = CASES["mixed"]
    out = run(desirable)
    metrics = kto_metrics(out.rewards, torch.tensor(POLICY, dtype=torch.float64), torch.tensor(desirable))
    good = [0.3 * (p - r) for p, r, d in zip(POLICY, REF, desirable) if d]
    bad = [0.3 * (p - r) for p, r, d in zip(POLICY, REF, desirable) if not d]
    assert float(metrics["rewards/chosen"]) == pytest.approx(sum(good) / 2)
    assert float(metrics["rewards/rejected"]) == pytest.approx(sum(bad) / 3)
    assert float(metrics["rewards/margins"]) == pytest.approx(sum(good) / 2 - sum(bad) / 3)
    assert float(metrics["logps/chosen"]) == pytest.approx((-4.0 - 3.2) / 2)
    assert float(metrics["logps/rejected"]) == pytest.approx((-6.5 - 8.0 - 5.1) / 3)
    assert float(out.z0) == pytest.approx(0.3875)
    only_good = kto_metrics(out.rewards, torch.tensor(POLICY), torch.ones(5, dtype=torch.bool))
    assert math.isnan(float(only_good["rewards/rejected"])) and not math.isnan(float(only_good["rewards/chosen"]))


def test_per_example_weights_against_the_formula_by_hand():
    """The annotation export's weight (2·label_prob − 1) multiplies each example's loss; by hand: p·L(label) +
    (1 − p)·L(other label) differs from (2p − 1)·L(label) by a constant (1 − p), so both give the same gradient."""
    desirable, beta, probs = [True, False, True, False, True], 0.3, [1.0, 0.9, 0.75, 0.6, 0.5]
    weights = [2 * p - 1 for p in probs]
    plain, z0 = by_hand(POLICY, REF, desirable, beta, KL_POLICY, KL_REF)

    def t(v):
        return torch.tensor(v, dtype=torch.float64)

    policy = t(POLICY).requires_grad_()
    out = kto_loss(policy, t(REF), torch.tensor(desirable), beta, kl_logratios=t(KL_POLICY) - t(KL_REF),
                   weights=t(weights))
    assert out.losses.tolist() == pytest.approx([w * loss for w, loss in zip(weights, plain)], rel=1e-12)
    assert float(out.z0) == pytest.approx(z0, rel=1e-12)
    out.losses.sum().backward()
    # the expected loss under the soft label, by finite differences of plain math
    eps = 1e-6
    for k, p in enumerate(probs):
        def expected(shift):
            moved = list(POLICY)
            moved[k] += shift
            hard, _ = by_hand(moved, REF, desirable, beta, KL_POLICY, KL_REF)
            soft, _ = by_hand(moved, REF, [not d for d in desirable], beta, KL_POLICY, KL_REF)
            return p * hard[k] + (1 - p) * soft[k]
        assert float(policy.grad[k]) == pytest.approx((expected(eps) - expected(-eps)) / (2 * eps), abs=1e-8)
